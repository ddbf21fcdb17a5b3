"""mokd-bench science: does MOKD beat training each network alone, on real images?

    mokd-bench science [--steps 300] [--seeds 3] [--nproc 2] [--config tiny_cpu] [--set KEY=VALUE ...]
                       [--work science_out] [--out FILE] [--png FILE] [--knn-every N] [--no-random-init]

Trains the recipe in both modes, `mokd` and `independent` (plain DINO per network: the paper's
baseline), for the same steps, with seeds 0..S-1 (`seed` changes the initial weights and the data
order and crops), on the demo's data: Fashion-MNIST from Debian's dataset-fashion-mnist package,
prepared into an ImageNet-shaped folder and WebDataset shards by the demo's own functions. Each run
is mokd-train under torchrun, as `make demo` runs it; its teachers' k-NN top-1 on the val shards
(logged by the trainer every --knn-every steps and at the last step) is read from its metrics.jsonl.

Reported per network: final k-NN top-1 mean ± std over seeds per mode, beside the same architectures
at random init from each run's seed (the curves' step 0), and the gain of MOKD over independent: the
difference of the means with its standard error sqrt(s_m²/n_m + s_i²/n_i), and the per-seed
differences (a seed gives both modes the same crops in the same order and network a the same initial
weights; network b's differ, as MOKD draws a's search head before b).
With train.term_gradients_every (mini_faithful sets it), also each loss term's share of the gradient at
each backbone over training (its norm over the sum of the terms' norms, mean over seeds) and the fraction
of backbone tensors clipped, per mode.
JSON (--out, else stdout), a table on stderr, a PNG of the k-NN curves per run and the final means (and
of the gradient shares). The images are prepared at the recipe's global crop size unless --image-size says.

Runs live in WORK/runs/MODE-seedS. A run whose final k-NN is in its metrics.jsonl is reused; an
unfinished one resumes from its last checkpoint: an interrupted benchmark continues where it stopped.
A run folder holding another configuration (other steps, recipe or --set) is an error, never
overwritten: use another --work, or delete that folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mokd_scale.config import ConfigError, add_set_argument, load_config, to_dict
from mokd_scale.tools import demo, plot_metrics
from mokd_scale.tools.bench.science_report import MODES, gradient_shares, plot, summarize

START_LINE = re.compile(r"^training steps (\d+)\.\.")
STEP_LINE = re.compile(r"^step (\d+)/(\d+) \|")
KNN_LINE = re.compile(r"^k-NN at step (\d+) .*: (a: .*)$")
# Lines of the trainer echoed on the console; everything goes to the run's train.log.
ECHOED = ("resumed from", "mokd-train:", "Traceback", "Error")


class BenchError(RuntimeError):
    """A user-fixable problem (settings clash, failed run): reported without a traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-bench science", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("science_out"),
                        help="folder for the data, the shards and the runs (reused by a later call)")
    parser.add_argument("--out", default="", help="write the JSON report here instead of stdout")
    parser.add_argument("--png", type=Path, default=None, help="plot (default: WORK/science.png)")
    parser.add_argument("--config", default="tiny_cpu", help="recipe name (mokd_scale/config/recipes/) or YAML path")
    add_set_argument(parser, "recipe fields of every run (not seed, mokd.mode, output_dir: the benchmark sets them)")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the recipe's train.steps)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per mode: 0..SEEDS-1")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated modes to train")
    parser.add_argument("--nproc", type=int, default=2, help="training ranks per run (CPU processes)")
    parser.add_argument("--knn-every", type=int, default=0,
                        help="k-NN every N steps for the curves (0: half the steps); always at the end")
    parser.add_argument("--no-random-init", dest="random_init", action="store_false",
                        help="skip the k-NN of each run's architectures at random init (the curves' step 0)")
    demo.add_data_arguments(parser)
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        parser.error(f"--modes: unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    for flag in ("seeds", "nproc"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1")
    owned = [item for item in args.set if item.split("=", 1)[0] in ("seed", "mokd.mode", "output_dir")]
    if owned:
        parser.error(f"--set {' '.join(owned)}: the benchmark sets seed, mokd.mode and output_dir itself "
                     "(use --seeds and --modes)")
    return args


# ------------------------------------------------------------------------------------------ runs

class Run:
    """One (mode, seed) training run and where its results live."""

    def __init__(self, mode: str, seed: int, work: Path):
        self.mode, self.seed = mode, seed
        self.dir = work / "runs" / f"{mode}-seed{seed}"

    @property
    def name(self) -> str:
        return f"{self.mode} seed {self.seed}"

    def overrides(self, shared: list[str]) -> list[str]:
        return [*shared, f"seed={self.seed}", f"mokd.mode={self.mode}", f"output_dir={self.dir}"]

    def final_knn(self, steps: int) -> dict | None:
        """{network: {top1, top5}} at the last step, once the run has logged it."""
        metrics = self.dir / "metrics.jsonl"
        if not metrics.is_file() or not (self.dir / "config.yaml").is_file():
            return None
        final = demo.final_knn_from_metrics(self.dir)
        return final if final and final["step"] == steps else None


def shared_overrides(args, indexes: dict[str, Path], steps: int) -> list[str]:
    knn_every = args.knn_every or max(1, steps // 2)
    return [*demo.shard_overrides(indexes), f"train.steps={steps}", f"train.knn_every={knn_every}", *args.set]


def check_settings(run: Run, config: str, overrides: list[str]) -> None:
    """A run folder is only continued with the configuration it was started with."""
    written = run.dir / "config.yaml"
    if not written.is_file():
        return
    expected = yaml.safe_load(yaml.safe_dump(to_dict(load_config(config, run.overrides(overrides)))))
    # Read back through the schema, so a setting added since the run started counts at its default.
    found = yaml.safe_load(yaml.safe_dump(to_dict(load_config(str(written)))))
    differing = sorted(differences(expected, found))
    if differing:
        shown = "; ".join(f"{key}: run has {old!r}, now {new!r}" for key, new, old in differing[:6])
        raise BenchError(f"{run.dir} was trained with other settings ({shown}). Its results are kept: "
                         f"use another --work, or delete that folder to retrain it.")


def differences(new, old, prefix: str = ""):
    if isinstance(new, dict) and isinstance(old, dict):
        for key in sorted(set(new) | set(old)):
            yield from differences(new.get(key), old.get(key), f"{prefix}{key}.")
    elif new != old:
        yield prefix.rstrip("."), new, old


class Progress:
    """Benchmark-wide ETA from the seconds per step measured in this call."""

    def __init__(self, runs_to_train: int, steps: int):
        self.total_steps = runs_to_train * steps
        self.done_steps = 0
        self.seconds = 0.0

    def eta(self, run_started: float, run_steps_done: int) -> str:
        from mokd_scale.train.metrics import format_duration  # imports torch: only once training runs
        done = self.done_steps + run_steps_done
        if done == 0:
            return "?"
        seconds = self.seconds + time.monotonic() - run_started
        return format_duration(seconds / done * (self.total_steps - done))

    def finish_run(self, steps_done: int, seconds: float) -> None:
        self.done_steps += steps_done
        self.seconds += seconds


class RunMonitor:
    """Turns mokd-train's console output into the benchmark's progress lines."""

    def __init__(self, prefix: str, progress: Progress):
        self.prefix, self.progress = prefix, progress
        self.started = time.monotonic()
        self.start_step = self.last_step = 0

    def feed(self, line: str) -> str | None:
        """The console line for one line of the trainer's output, if it deserves one."""
        if match := START_LINE.match(line):
            self.start_step = self.last_step = int(match[1])
        elif match := STEP_LINE.match(line):
            self.last_step, total = int(match[1]), int(match[2])
            run_eta = line.rsplit("ETA ", 1)[-1].split(" ")[0] if "ETA " in line else "?"
            benchmark_eta = self.progress.eta(self.started, self.last_step - self.start_step)
            return f"{self.prefix}: step {self.last_step}/{total}, run ETA {run_eta}, benchmark ETA {benchmark_eta}"
        elif match := KNN_LINE.match(line):
            return f"{self.prefix}: k-NN at step {match[1]}: {match[2]}"
        elif any(marker in line for marker in ECHOED):
            return f"{self.prefix}: {line}"
        return None

    def finish(self) -> float:
        seconds = time.monotonic() - self.started
        self.progress.finish_run(self.last_step - self.start_step, seconds)
        return seconds


def train_run(run: Run, label: str, args, overrides: list[str], progress: Progress) -> float:
    """mokd-train for one run, its output in RUN/train.log; progress lines on the console.
    Resumes from the run's last checkpoint when there is one. Returns the seconds it took."""
    run.dir.mkdir(parents=True, exist_ok=True)
    command = demo.train_command(args.nproc, args.config, run.overrides(overrides), resume="auto")
    monitor = RunMonitor(f"[science] {label} {run.name}", progress)
    say(f"{monitor.prefix}: training in {run.dir} (log: train.log)")
    with open(run.dir / "train.log", "a") as log:
        process = subprocess.Popen([str(c) for c in command], env=demo.child_env(), text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in process.stdout:
            log.write(line)
            log.flush()
            message = monitor.feed(line.rstrip("\n"))
            if message:
                say(message)
        code = process.wait()
    if code != 0:
        tail = (run.dir / "train.log").read_text().splitlines()[-25:]
        raise BenchError(f"{run.name}: mokd-train exited {code}; last lines of {run.dir / 'train.log'}:\n"
                         + "\n".join(tail))
    return monitor.finish()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_init_knn(run: Run) -> dict:
    """k-NN of the run's architectures with fresh weights from its seed (mokd-eval-knn --random-init),
    kept in RUN/random_init.json: the step-0 point of the curves."""
    path = run.dir / "random_init.json"
    if not path.is_file():
        try:
            with stdout_to_stderr():
                result = demo.knn(run.dir, random_init=True)
        except demo.StageFailed as error:
            raise BenchError(f"{run.name}: {error}") from None
        path.write_text(json.dumps(result) + "\n")
    return json.loads(path.read_text())


def run_record(run: Run, steps: int, reused: bool, seconds: float | None, with_random_init: bool,
               networks: tuple[str, ...]) -> dict:
    final = run.final_knn(steps)
    if final is None:
        raise BenchError(f"{run.name}: no k-NN at step {steps} in {run.dir / 'metrics.jsonl'} after training")
    rows = plot_metrics.read_metrics(run.dir / "metrics.jsonl")
    start = random_init_knn(run) if with_random_init else None
    # A resumed run logs the steps after its checkpoint again: the later row of a step wins.
    curves = {name: sorted({**({0: start[name]["top1"]} if start else {}),
                            **{row["step"]: row[f"knn.{name}.top1"] for row in rows if f"knn.{name}.top1" in row}}.items())
              for name in networks}
    last_losses = next((row for row in reversed(rows) if f"{networks[0]}.loss" in row), {})
    # train.term_gradients_every: each measuring step's norm per term at each backbone, and the clipped fraction.
    gradients = {name: {row["step"]: {key.split(".", 2)[2]: value for key, value in row.items()
                                      if key.startswith(f"{name}.grad.")}
                        for row in rows if any(key.startswith(f"{name}.grad.") for key in row)}
                 for name in networks}
    return {"mode": run.mode, "seed": run.seed, "run_dir": str(run.dir), "reused": reused,
            "train_seconds": seconds, "final_top1": {n: final[n]["top1"] for n in networks},
            "random_init_top1": {n: start[n]["top1"] for n in networks} if start else None,
            "final_top5": {n: final[n]["top5"] for n in networks}, "knn_curve": curves,
            "term_gradients": {n: sorted(gradients[n].items()) for n in networks},
            "last_logged": {key: value for key, value in last_losses.items()
                            if key.split(".")[0] in networks and isinstance(value, (int, float))}}


# ---------------------------------------------------------------------------------------- main

def prepare(args, work: Path) -> tuple[dict[str, Path], dict[str, int]]:
    """The demo's data preparation: Fashion-MNIST folder, then train and val shards (both reused)."""
    try:
        with stdout_to_stderr():
            written = demo.prepare_data(args, work / "fashion_mnist")
            indexes = demo.make_shards(work / "fashion_mnist", work / "shards", written, args.nproc)
    except demo.StageFailed as error:
        raise BenchError(str(error)) from None
    return indexes, written


@contextlib.contextmanager
def stdout_to_stderr():
    """The demo's stages print, and their subprocesses write, to stdout: keep it for the JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_science_bench(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work.resolve()
    try:
        config = load_config(args.config, args.set)
    except (ConfigError, FileNotFoundError) as error:
        raise BenchError(f"--config/--set: {error}") from None
    steps = args.steps or config.train.steps
    demo.resolve_image_size(args)
    runs = [Run(mode, seed, work) for seed in range(args.seeds) for mode in args.modes]
    # Settings are checked for every run before any data is prepared or any run trains.
    placeholder = {"train": work / "shards" / "imagenet-train.json", "val": work / "shards" / "imagenet-val.json"}
    overrides = shared_overrides(args, placeholder, steps)
    for run in runs:
        check_settings(run, args.config, overrides)
    say(f"[science] preparing data in {work}")
    indexes, written = prepare(args, work)
    if indexes != placeholder:
        raise BenchError(f"shard indexes at {indexes}, expected {placeholder}")
    to_train = [run for run in runs if run.final_knn(steps) is None]
    progress = Progress(len(to_train), steps)
    records = []
    for number, run in enumerate(runs, 1):
        label = f"run {number}/{len(runs)}"
        if run in to_train:
            seconds = train_run(run, label, args, overrides, progress)
            records.append(run_record(run, steps, False, seconds, args.random_init, tuple(config.networks)))
        else:
            say(f"[science] {label} {run.name}: reusing the final k-NN in {run.dir}")
            records.append(run_record(run, steps, True, None, args.random_init, tuple(config.networks)))
    report = {
        "benchmark": "science", "config": args.config, "set": args.set, "steps": steps,
        "seeds": list(range(args.seeds)), "modes": args.modes, "nproc": args.nproc, "work": str(work),
        "data": {"dataset": "Fashion-MNIST", "source": str(args.source), "train_images": written["train"],
                 "val_images": written["val"], "image_size": args.image_size},
        "knn": {"k": config.eval.knn_k, "temperature": config.eval.knn_temperature,
                "max_train_samples": config.eval.max_train_samples, "max_val_samples": config.eval.max_val_samples},
        "networks": {name: {"arch": net.arch, "arch_kwargs": net.arch_kwargs, "lambda": net.lambda_cross}
                     for name, net in config.networks.items()},
        "epochs": steps * config.train.global_batch_size / written["train"],
        "runs": records,
        "summary": summarize(records),
        "gradient_shares": gradient_shares(records),
    }
    report["png"] = str(plot(report, args.png or work / "science.png"))
    return report
