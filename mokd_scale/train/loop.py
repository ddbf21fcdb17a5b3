"""The training run behind mokd-train: one Trainer per rank, from resume to the last checkpoint.

The command line and the exit protocol are in train/cli.py; this module holds what needs torch,
DeepSpeed and timm, so that `mokd-train --help` answers without loading them.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mokd_scale.config import Config, ConfigError, to_dict, write_config
from mokd_scale.engine.learner import Learner
from mokd_scale.method.terms import TERMS
from mokd_scale.method.objective import Objective
from mokd_scale.models import pair_search_dim
from mokd_scale.runtime import dist, faults
from mokd_scale.runtime.exit_codes import EXIT_CONFIG, EXIT_NON_FINITE, EXIT_PREEMPTED, EXIT_RESUME, EXIT_SAVE_FAILED
from mokd_scale.train import checkpoint
from mokd_scale.train.init_weights import initial_weights, start_message
from mokd_scale.train.metrics import MetricsWriter, StepAccumulator, console_line, peak_memory_gib
from mokd_scale.train.schedules import Schedules
from mokd_scale.train.state import Progress, run_state
from mokd_scale.train.step import NonFiniteLoss, Step


def train(config: Config, info: dist.DistInfo, resume: str) -> int:
    try:
        trainer = Trainer(config, info, resume)
    except checkpoint.CheckpointError as error:  # every rank gets the same verdict from rank 0
        if info.is_main:
            print(f"mokd-train: cannot resume: {error}", file=sys.stderr, flush=True)
        return EXIT_RESUME
    except ConfigError as error:  # networks.X.init, read when no checkpoint was found after all: every rank alike
        if info.is_main:
            print(f"mokd-train: config error: {error}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    return trainer.run()


class PreemptionFlag:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption) → save and exit 75."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.raised = True


def build_learners(config: Config, info: dist.DistInfo, fresh: bool = True, log=None) -> dict[str, Learner]:
    """Every network's Learner, in the recipe's order, with identical initial weights on every rank (the
    teachers are copied before DeepSpeed broadcasts). A fresh run starts each network from its
    networks.X.init when set (read one network at a time: one network's weights in memory at once)."""
    torch.manual_seed(config.seed)
    search_dim = pair_search_dim(config)
    learners = {}
    for name in config.networks:
        initial = initial_weights(config, name, search_dim) if fresh else None
        if initial is not None and log is not None:
            log(start_message(name, initial))
        learners[name] = Learner(name, config, search_dim, info.device, info.world_size, initial)
    return learners


class Trainer:
    def __init__(self, config: Config, info: dist.DistInfo, resume: str):
        from mokd_scale.data import build_train_loader
        self.config, self.info = config, info
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.log(f"mokd-train rank {info.rank}/{info.world_size} ready on {info.device} "
                 f"(host {socket.gethostname()}, pid {os.getpid()})", all_ranks=True)
        resume_dir = self.choose_resume(resume)
        saved = checkpoint.load_state(resume_dir) if resume_dir else None
        self.progress = Progress(int(saved["step"]) if saved is not None else 0)
        self.learners = build_learners(config, info, fresh=saved is None, log=self.log)
        if saved is not None:
            self.note_init_ignored(resume_dir)
        seed_everything(config.seed * 1000 + info.rank + self.progress.step)  # replaced by a checkpoint's RNG
        self.loader = build_train_loader(config, info.rank, info.world_size, self.progress.step)
        self.state = run_state(self.learners, self.loader, self.progress)
        if saved is not None:
            notes = self.state.load(resume_dir, saved)
            rng = "restored" if saved.get("world_size") == info.world_size else "re-seeded from the step"
            self.log(f"resumed from {resume_dir.name} (step {self.progress.step}, saved by {saved.get('world_size')} "
                     f"ranks, now {info.world_size}): teachers, centres and step loaded; " + "; ".join(notes) +
                     f"; data {self.data_resume_note()}; RNG {rng}")
        self.schedules = Schedules.build(config)
        self.objective = Objective(config)
        self.step = Step(self.learners, self.objective, self.schedules, config)
        self.preemption = PreemptionFlag()
        self.networks = tuple(config.networks)
        self.writer = MetricsWriter(self.output_dir, enabled=info.is_main, networks=self.networks)

    def log(self, message: str, all_ranks: bool = False) -> None:
        if all_ranks or self.info.is_main:
            prefix = f"[rank{self.info.rank}] " if all_ranks else ""
            print(prefix + message, flush=True)

    def note_init_ignored(self, resume_dir: Path) -> None:
        keys = [f"networks.{name}.init" for name, net in self.config.networks.items() if net.init]
        if keys:
            self.log(f"{', '.join(keys)} ignored: resuming from {resume_dir.name}, whose weights win")

    def choose_resume(self, resume: str) -> Path | None:
        """Rank 0 checks the checkpoints against their manifests; every rank loads what it chose."""
        verdict = None
        if self.info.is_main:
            try:
                verdict = (*checkpoint.choose_resume(resume, self.checkpoint_dir), None)
            except checkpoint.CheckpointError as error:
                verdict = (None, [], str(error))
        tag_dir, warnings, error = dist.broadcast_object(verdict)
        for warning in warnings:
            self.log(f"WARNING: {warning}")
        if error:
            raise checkpoint.CheckpointError(error)
        if self.info.is_main and resume == "auto" and tag_dir is not None \
                and checkpoint.read_latest(self.checkpoint_dir) != tag_dir.name:
            # `latest` now names what the run continues from; the next save of the damaged tag's step replaces it.
            checkpoint.write_latest(self.checkpoint_dir, tag_dir.name)
        return tag_dir

    def run(self) -> int:
        if self.info.is_main:
            write_config(self.config, self.output_dir / "config.yaml")
        train = self.config.train
        start = self.progress.step
        end = min(train.steps, start + train.stop_after_steps) if train.stop_after_steps > 0 else train.steps
        try:
            code = self.loop(start, end)
        except NonFiniteLoss as error:
            code = self.stop_on_non_finite(error)
        except checkpoint.CheckpointWriteFailed as error:
            self.log(f"mokd-train: {error}")
            code = EXIT_SAVE_FAILED
        finally:
            self.writer.close()
        dist.barrier()  # the ranks leave together (train/cli.py: the exit protocol)
        return code

    def stop_on_non_finite(self, error: NonFiniteLoss) -> int:
        try:
            self.save_diagnostic(error.step)
        except checkpoint.CheckpointWriteFailed as failure:
            self.log(f"mokd-train: {error}; the diagnostic checkpoint failed too: {failure}")
            return EXIT_NON_FINITE
        self.log(f"mokd-train: {error}; diagnostic checkpoint in {self.diagnostic_dir(error.step)}; "
                 f"lower the lr or check the data", all_ranks=True)
        return EXIT_NON_FINITE

    def loop(self, start: int, end: int) -> int:
        train = self.config.train
        batches, accumulation = iter(self.loader), self.loader.micro_batches_per_step
        meter = StepAccumulator(self.config.mokd.out_dim, self.info.device, self.objective.term_names, self.networks)
        self.log(f"training steps {start}..{end} of {train.steps}; {accumulation} micro-batch(es) of "
                 f"{train.micro_batch_size} per rank per step; data {self.data_resume_note()}")
        step = start
        while step < end:
            faults.step_starts(step)
            micro_batches = [next(batches) for _ in range(accumulation)]
            record = self.step(step, micro_batches)
            meter.add(record)
            step += 1
            self.progress.step = step
            if record.term_gradients:
                self.log_term_gradients(step, record)
            if step % train.log_every == 0 or step == end:
                self.log_metrics(step, meter)
            if train.knn_every and (step % train.knn_every == 0 or step == train.steps):
                self.evaluate_knn(step)
            if dist.any_rank(self.preemption.raised, self.info.device):
                self.save(step)
                self.log(f"preempted: checkpoint {checkpoint.tag_for(step)} saved; exiting {EXIT_PREEMPTED} to requeue",
                         all_ranks=True)
                return EXIT_PREEMPTED
            if step % train.checkpoint_every == 0 or step == end:
                self.save(step)
        self.log(f"done at step {step}")
        return 0

    def data_resume_note(self) -> str:
        if self.config.data.source == "synthetic":
            return "synthetic (a function of the step)"
        if self.loader.continued:
            return "continues the saved stream positions"
        if self.loader.carried:
            return "streams take over the unread samples of the saved ranks' streams"
        return "starts fresh streams" + (" (no usable saved position)" if self.progress.step else "")

    def log_metrics(self, step: int, meter: StepAccumulator) -> None:
        values = meter.reduce()
        values.update(self.schedules.at(step - 1).log_items())
        values["peak_memory_gib"] = peak_memory_gib(self.info.device)
        remaining = self.config.train.steps - step
        self.log(console_line(step, self.config.train.steps, values, remaining * values["seconds_per_step"],
                              self.networks))
        self.writer.write(step, values)
        meter.reset()

    def log_term_gradients(self, step: int, record) -> None:
        """A measuring step's line: each term's gradient norm at each backbone, and the clipped fraction."""
        values = record.gradient_items()
        shown = "  ".join(f"{name}: " + " ".join(f"{TERMS[t].abbreviation} {v:.3g}" for t, v in norms.items())
                          + (f" clipped {record.clipped_fraction[name]:.0%}"
                             if record.clipped_fraction.get(name) is not None else "")
                          for name, norms in record.term_gradients.items())
        self.log(f"term gradients at the backbones, step {step}: {shown}")
        self.writer.write(step, values)

    def evaluate_knn(self, step: int) -> None:
        """k-NN of every teacher's backbone on the val shards; a collective on every rank."""
        from mokd_scale.eval.knn import evaluate_knn
        started = time.monotonic()
        teachers = {name: learner.teacher for name, learner in self.learners.items()}
        results = evaluate_knn(teachers, self.config, self.info.rank, self.info.world_size, self.info.device)
        values = {f"knn.{name}.{metric}": value for name, result in results.items() for metric, value in result.items()}
        summary = "  ".join(f"{name}: top-1 {r['top1']:.2f} top-5 {r['top5']:.2f}" for name, r in results.items())
        self.log(f"k-NN at step {step} ({time.monotonic() - started:.0f} s): {summary}")
        self.writer.write(step, values)

    def save(self, step: int) -> None:
        started = time.monotonic()
        tag = checkpoint.save_checkpoint(self.checkpoint_dir, step, self.state, {"config": to_dict(self.config)},
                                         self.config.train.keep_last)
        self.log(f"checkpoint {tag} saved in {time.monotonic() - started:.1f} s")

    def diagnostic_dir(self, step: int) -> Path:
        return self.output_dir / f"diagnostic_step_{step:08d}"

    def save_diagnostic(self, step: int) -> None:
        """Weights as they were when the loss went bad, outside checkpoints/ so resume never picks them."""
        self.progress.step = step
        checkpoint.save_checkpoint(self.diagnostic_dir(step), step, self.state,
                                   {"config": to_dict(self.config), "diagnostic": True}, keep_last=1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
