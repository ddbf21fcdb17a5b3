"""The CPU demo (`make demo`): a real MOKD run on Fashion-MNIST in minutes, end to end.

  1. Fashion-MNIST (Debian package) -> ImageNet-shaped folder     mokd-fashion-mnist
  2. folder -> WebDataset shards + index (train, val)              mokd-shards
  3. train the tiny_cpu recipe on 2 CPU ranks via torchrun          mokd-train
  4. k-NN of both teachers (logged by the trainer halfway and at the end) vs the same
     backbones at random init                                      mokd-eval-knn --random-init
  5. table on the console + PNG of loss terms and k-NN             mokd-plot

Prepared images and shards are reused when present; the training run starts fresh.
Outputs: OUT/run (checkpoints, metrics.jsonl, tensorboard), OUT/run/demo.png, OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from mokd_scale.config import add_set_argument
from mokd_scale.tools import make_shards as make_shards_tool
from mokd_scale.tools import plot_metrics, prepare_fashion_mnist


class StageFailed(RuntimeError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for data, shards, the run and results")
    add_data_arguments(parser)
    parser.add_argument("--nproc", type=int, default=2, help="training ranks (CPU processes)")
    parser.add_argument("--config", default="tiny_cpu", help="recipe to train")
    add_set_argument(parser, "fields of the recipe trained")
    return parser.parse_args(argv)


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The prepared data's options (shared with mokd-bench science, which trains on the same data)."""
    parser.add_argument("--source", type=Path, default=prepare_fashion_mnist.DEBIAN_DIR,
                        help="folder with Fashion-MNIST's *-idx?-ubyte.gz files (default: Debian's package)")
    parser.add_argument("--train-per-class", type=int, default=500, help="Fashion-MNIST train images per class")
    parser.add_argument("--val-per-class", type=int, default=200, help="val images per class")
    parser.add_argument("--image-size", type=int, default=0,
                        help="prepared image size in px (28 = native; default: the recipe's global crop size)")


def resolve_image_size(args) -> None:
    """--image-size 0: the images are prepared at the recipe's global crop size."""
    if not args.image_size:
        from mokd_scale.config import load_config
        args.image_size = load_config(args.config, args.set).data.global_crop_size


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    if Path(".cache/torch_extensions").is_dir():  # a checkout's cache of DeepSpeed's JIT ops (see Makefile)
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(".cache/torch_extensions").resolve()))
    env.setdefault("MPLBACKEND", "Agg")
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: the ranks share the machine's cores
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(command: list[str], what: str, env: dict | None = None, capture: bool = False) -> str:
    """Run a stage's command; output streams to the console unless captured."""
    print("  $ " + " ".join(str(c) for c in command), flush=True)
    result = subprocess.run([str(c) for c in command], env=env or child_env(), text=True,
                            stdout=subprocess.PIPE if capture else None)
    if result.returncode != 0:
        raise StageFailed(f"{what} failed (exit {result.returncode})")
    return result.stdout or ""


def prepare_data(args, data_dir: Path) -> dict[str, int]:
    try:
        written = prepare_fashion_mnist.prepare(args.source, data_dir, args.train_per_class,
                                                args.val_per_class, args.image_size)
    except FileNotFoundError as error:
        raise StageFailed(str(error)) from None
    print(f"  {data_dir}: {written['train']} train, {written['val']} val images")
    return written


def make_shards(data_dir: Path, shard_dir: Path, samples: dict[str, int], nproc: int) -> dict[str, Path]:
    """Train and val shards; at least 2 shards per rank so no rank's loader is left without one.
    Shards made from the prepared folder as it is now are reused; others are rebuilt."""
    prepared = (data_dir / prepare_fashion_mnist.PREPARED_MARKER).read_text()
    indexes = {}
    for split in ("train", "val"):
        index, source = shard_dir / f"imagenet-{split}.json", shard_dir / f".imagenet-{split}.prepared"
        indexes[split] = index
        if index.is_file() and source.is_file() and source.read_text() == prepared:
            print(f"  reusing {index}")
            continue
        if index.is_file():  # made from a folder of other settings, which prepare_data has replaced
            print(f"  {index}: made from other data settings, rebuilding")
            remove_shards(shard_dir, split)
        per_shard = max(1, -(-samples[split] // (4 * nproc)))
        run([sys.executable, "-m", "mokd_scale.tools.make_shards", "--imagenet-root", data_dir, "--split", split,
             "--out", shard_dir, "--samples-per-shard", per_shard, "--workers", 2], f"make_shards {split}")
        source.write_text(prepared)
    return indexes


def remove_shards(shard_dir: Path, split: str) -> None:
    folder = make_shards_tool.OutputFolder(shard_dir, split)
    for tar in shard_dir.glob(f"{folder.name}-*.tar"):
        tar.unlink()
    folder.index.unlink(missing_ok=True)
    shutil.rmtree(folder.state, ignore_errors=True)


def knn_every(args) -> list[str]:
    """k-NN of the teachers halfway and at the end of training (the plot's curve), unless the
    recipe or --set already asks for a schedule."""
    from mokd_scale.config import load_config

    train_cfg = load_config(args.config, args.set).train
    if train_cfg.knn_every:
        return []
    return [f"train.knn_every={max(1, train_cfg.steps // 2)}"]


def shard_overrides(indexes: dict[str, Path]) -> list[str]:
    return ["data.source=shards", f"data.train_shards={indexes['train']}", f"data.val_shards={indexes['val']}"]


def train_command(nproc: int, config: str, overrides: list[str], resume: str = "none") -> list:
    """mokd-train on `nproc` CPU ranks of this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", nproc,
            "-m", "mokd_scale.train", "--config", config, "--resume", resume, "--set", *overrides]


def train(args, indexes: dict[str, Path], run_dir: Path) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time; data and shards are what is reused
    overrides = [*shard_overrides(indexes), f"output_dir={run_dir}", *knn_every(args), *args.set]
    run(train_command(args.nproc, args.config, overrides), "training")


def run_networks(run_dir: Path) -> list[str]:
    """The network names of a run, in its recipe's order (from the resolved config it wrote)."""
    return list(yaml.safe_load((run_dir / "config.yaml").read_text())["networks"])


def final_knn_from_metrics(run_dir: Path) -> dict | None:
    """The trainer's own k-NN at its last step (same function as mokd-eval-knn), if logged."""
    rows = plot_metrics.read_metrics(run_dir / "metrics.jsonl")
    names = run_networks(run_dir)
    last_step = max((row["step"] for row in rows), default=-1)
    for row in reversed(rows):
        if row["step"] == last_step and all(f"knn.{n}.top1" in row for n in names):
            result = {n: {"top1": row[f"knn.{n}.top1"], "top5": row[f"knn.{n}.top5"]} for n in names}
            return {**result, "step": last_step, "source": "metrics.jsonl"}
    return None


def trained_knn(run_dir: Path) -> dict:
    return final_knn_from_metrics(run_dir) or knn(run_dir, random_init=False)


def knn(run_dir: Path, random_init: bool) -> dict:
    command = [sys.executable, "-m", "mokd_scale.tools.eval_knn", "--checkpoint", run_dir / "checkpoints"]
    env = child_env()
    env["OMP_NUM_THREADS"] = "2"  # one process: use both cores
    output = run(command + (["--random-init"] if random_init else []),
                 "k-NN (random init)" if random_init else "k-NN", env=env, capture=True)
    return json.loads(output.strip().splitlines()[-1])


def table(trained: dict, baseline: dict, config: dict) -> str:
    lines = [f"{'network':<8} {'arch':<24} {'random-init top1/top5':>22} {'trained top1/top5':>20} {'gain':>7}"]
    for name in config["networks"]:
        arch = config["networks"][name]["arch"]
        before, after = baseline[name], trained[name]
        lines.append(f"{name:<8} {arch:<24} {before['top1']:>12.2f} / {before['top5']:<7.2f} "
                     f"{after['top1']:>10.2f} / {after['top5']:<7.2f} {after['top1'] - before['top1']:>+7.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    resolve_image_size(args)
    work = args.out.resolve()
    data_dir, shard_dir, run_dir = work / "fashion_mnist", work / "shards", work / "run"
    timings: dict[str, float] = {}

    def stage(name, fn, *fn_args):
        print(f"\n== {name}", flush=True)
        started = time.monotonic()
        value = fn(*fn_args)
        timings[name] = time.monotonic() - started
        print(f"   ({name}: {timings[name]:.0f} s)", flush=True)
        return value

    try:
        stage("prepare Fashion-MNIST", prepare_data, args, data_dir)
        samples = {"train": 10 * args.train_per_class, "val": 10 * args.val_per_class}
        indexes = stage("make shards", make_shards, data_dir, shard_dir, samples, args.nproc)
        stage("train", train, args, indexes, run_dir)
        trained = stage("k-NN of the trained teachers", trained_knn, run_dir)
        baseline = stage("k-NN at random init", knn, run_dir, True)
    except StageFailed as error:
        print(f"\ndemo: {error}", file=sys.stderr)
        return 1
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    png = plot_metrics.plot(plot_metrics.read_metrics(run_dir / "metrics.jsonl"), run_dir / "demo.png",
                            baselines={n: baseline[n]["top1"] for n in config["networks"]},
                            final={n: (trained["step"], trained[n]["top1"]) for n in config["networks"]},
                            out_dim=config["mokd"]["out_dim"],
                            title=f"MOKD {args.config} on Fashion-MNIST, step {trained['step']}")
    results = {"trained": trained, "random_init": baseline, "timings_s": timings}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n== k-NN top-1/top-5 (%), k={config['eval']['knn_k']}, T={config['eval']['knn_temperature']}, "
          f"step {trained['step']}\n{table(trained, baseline, config)}")
    print("\n== stage timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f} s")
    print(f"plot: {png}\nresults: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
