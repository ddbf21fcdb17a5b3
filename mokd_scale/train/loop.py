"""The training run behind mokd-train: one Trainer per rank, from resume to the last checkpoint.

The command line, the exit codes and the exit protocol are in mokd_scale/train/cli.py; this module holds
what needs torch, DeepSpeed and timm, so that `mokd-train --help` answers without loading them.
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

from mokd_scale.train import checkpoint
from mokd_scale.runtime import dist
from mokd_scale.runtime import faults
from mokd_scale.config import NETWORKS, Config, to_dict, write_config
from mokd_scale.train.step import Coordinator, NonFiniteLoss
from mokd_scale.engine.learner import Learner, zero_stage_of
from mokd_scale.train.metrics import MetricsWriter, StepAccumulator, console_line, peak_memory_gib
from mokd_scale.models import pair_search_dim
from mokd_scale.train.schedules import Schedules
from mokd_scale.runtime.exit_codes import EXIT_NON_FINITE, EXIT_PREEMPTED, EXIT_RESUME, EXIT_SAVE_FAILED

def train(config: Config, info: dist.DistInfo, resume: str) -> int:
    try:
        trainer = Trainer(config, info, resume)
    except checkpoint.CheckpointError as error:  # every rank gets the same verdict from rank 0
        if info.is_main:
            print(f"mokd-train: cannot resume: {error}", file=sys.stderr, flush=True)
        return EXIT_RESUME
    return trainer.run()


class PreemptionFlag:
    """SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption) → save and exit 75."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        self.raised = True


class Trainer:
    def __init__(self, config: Config, info: dist.DistInfo, resume: str):
        self.config = config
        self.info = info
        self.output_dir = Path(config.output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.log(f"mokd-train rank {info.rank}/{info.world_size} ready on {info.device} "
                 f"(host {socket.gethostname()}, pid {os.getpid()})", all_ranks=True)
        self.resume_dir = self.choose_resume(resume)
        self.schedules = Schedules.build(config)
        self.start_step = 0
        self.data_position = None  # this rank's data-stream position saved in the checkpoint
        self.loader = None
        self.learners = self.build_learners()
        self.coordinator = Coordinator(config, self.learners, self.schedules, info.device)
        self.preemption = PreemptionFlag()
        self.writer = MetricsWriter(self.output_dir, enabled=info.is_main)

    def log(self, message: str, all_ranks: bool = False) -> None:
        if all_ranks or self.info.is_main:
            prefix = f"[rank{self.info.rank}] " if all_ranks else ""
            print(prefix + message, flush=True)

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

    def build_learners(self) -> dict[str, Learner]:
        state = checkpoint.load_state(self.resume_dir) if self.resume_dir else None
        plans = self.resume_plans(state) if state is not None else {}
        # Identical initial weights on every rank: the teachers are copied before DeepSpeed broadcasts.
        torch.manual_seed(self.config.seed)
        search_dim = pair_search_dim(self.config)
        learners = {}
        for name in NETWORKS:
            plan = plans.get(name)
            weights = checkpoint.student_weights(self.resume_dir, name) if plan == checkpoint.WEIGHTS_ONLY else None
            learners[name] = Learner(name, self.config, search_dim, self.info.device, self.info.world_size,
                                     load_universal=plan == checkpoint.UNIVERSAL, initial_weights=weights)
        self.start_step = int(state["step"]) if state is not None else 0
        # Replaced by the saved generators where they apply (same world size).
        seed_everything(self.config.seed * 1000 + self.info.rank + self.start_step)
        if state is not None:
            self.data_position = checkpoint.restore(self.resume_dir, learners, state, plans)
            self.log(f"resumed from {self.resume_dir.name} (step {self.start_step}, saved by "
                     f"{state.get('world_size')} ranks, now {self.info.world_size})")
        return learners

    def resume_plans(self, state: dict) -> dict[str, str]:
        plans = {}
        for name in NETWORKS:
            net = getattr(self.config.networks, name)
            plans[name] = checkpoint.resume_plan(state, zero_stage_of(net), net.optimizer)
            if plans[name] == checkpoint.UNIVERSAL:
                self.log(f"network {name}: saved by {state.get('world_size')} ranks, resuming on "
                         f"{self.info.world_size}: converting to a DeepSpeed universal checkpoint")
                checkpoint.convert_to_universal(self.resume_dir, name)
            elif plans[name] == checkpoint.WEIGHTS_ONLY:
                self.log(f"WARNING network {name}: {net.optimizer} state sharded over {state.get('world_size')} "
                         f"ranks cannot be re-sharded onto {self.info.world_size} (DeepSpeed's universal format "
                         f"is Adam-only): fp32 weights restored, {net.optimizer} momentum restarts from zero")
        return plans

    def run(self) -> int:
        if self.info.is_main:
            write_config(self.config, self.output_dir / "config.yaml")
        train = self.config.train
        end = train.steps
        if train.stop_after_steps > 0:
            end = min(end, self.start_step + train.stop_after_steps)
        try:
            code = self.loop(self.start_step, end)
        except NonFiniteLoss as error:
            code = self.stop_on_non_finite(error)
        except checkpoint.CheckpointWriteFailed as error:
            self.log(f"mokd-train: {error}")
            code = EXIT_SAVE_FAILED
        finally:
            self.writer.close()
        dist.barrier()  # the ranks leave together (module docstring)
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
        from mokd_scale.data import build_train_loader
        train = self.config.train
        self.loader = build_train_loader(self.config, self.info.rank, self.info.world_size, start, self.data_position)
        batches, accumulation = iter(self.loader), self.loader.micro_batches_per_step
        meter = StepAccumulator(self.config.mokd.out_dim, self.info.device, self.coordinator.term_names)
        self.log(f"training steps {start}..{end} of {train.steps}; {accumulation} micro-batch(es) of "
                 f"{train.micro_batch_size} per rank per step; data {self.data_resume_note()}")
        step = start
        while step < end:
            faults.step_starts(step)
            micro_batches = [next(batches) for _ in range(accumulation)]
            meter.add(self.coordinator.train_step(step, micro_batches))
            step += 1
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
        if getattr(self.loader.dataset, "continued", False):
            return "continues the saved stream positions"
        return "starts fresh streams" + (" (no usable saved position)" if self.start_step else "")

    def log_metrics(self, step: int, meter: StepAccumulator) -> None:
        values = meter.reduce()
        values.update(self.schedules.at(step - 1))
        values["peak_memory_gib"] = peak_memory_gib(self.info.device)
        remaining = self.config.train.steps - step
        self.log(console_line(step, self.config.train.steps, values, remaining * values["seconds_per_step"]))
        self.writer.write(step, values)
        meter.reset()

    def evaluate_knn(self, step: int) -> None:
        """k-NN of both teachers' backbones on the val shards; a collective on every rank."""
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
        extra = {"config": to_dict(self.config), "data": {"step": step}}
        tag = checkpoint.save_checkpoint(self.checkpoint_dir, step, self.learners, extra, self.config.train.keep_last,
                                         self.loader.state_dict() if self.loader else None)
        self.log(f"checkpoint {tag} saved in {time.monotonic() - started:.1f} s")

    def diagnostic_dir(self, step: int) -> Path:
        return self.output_dir / f"diagnostic_step_{step:08d}"

    def save_diagnostic(self, step: int) -> None:
        """Weights as they were when the loss went bad, outside checkpoints/ so resume never picks them."""
        extra = {"config": to_dict(self.config), "data": {"step": step}, "diagnostic": True}
        checkpoint.save_checkpoint(self.diagnostic_dir(step), step, self.learners, extra, keep_last=1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
