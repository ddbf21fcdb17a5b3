"""The MOKD step over two Learners (DESIGN.md section 2, invariant 5).

Per micro-batch: both teachers forward on the global crops (no grad) → A's student forward,
A's four losses, A's backward → the same for B. Only one student's activations are alive
at a time; what passes between the networks (teacher outputs, queries) is detached.
At the end of the optimizer step: both engines step, both teachers take an EMA step,
both pairs of centres take their global-batch update.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mokd_scale import dist, faults
from mokd_scale.config import Config
from mokd_scale.data import normalize_crops
from mokd_scale.learner import Learner
from mokd_scale.mokd_terms import TeacherOutputs, network_losses, teacher_forward
from mokd_scale.profiling import phase
from mokd_scale.schedules import Schedules

TERMS = ("self_proj", "self_search", "cross_proj", "cross_search", "loss")
PARTNER = {"a": "b", "b": "a"}


class NonFiniteLoss(RuntimeError):
    """A loss or gradient norm was NaN/inf on some rank; every rank raises it together."""

    def __init__(self, network: str, term: str, step: int):
        super().__init__(f"non-finite {term} in network {network} at step {step}")
        self.network, self.term, self.step = network, term, step


@dataclass
class StepStats:
    """Per-step sums on this rank, kept on the device: reading them every micro-batch would stall
    the host on the GPU. They are reduced across ranks and read only when a line is logged."""
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # network → (len(TERMS),) sums
    teacher_entropy: dict[str, torch.Tensor] = field(default_factory=dict)  # network → scalar sum
    teacher_mean_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # network → (K,) sum
    micro_batches: int = 0
    images: int = 0
    skipped: int = 0

    def term(self, network: str, term: str) -> float:
        return float(self.terms[network][TERMS.index(term)])


class Coordinator:
    def __init__(self, config: Config, learners: dict[str, Learner], schedules: Schedules, device: torch.device):
        self.config = config
        self.learners = learners
        self.schedules = schedules
        self.device = device
        self.mean = config.data.mean
        self.std = config.data.std

    def train_step(self, step: int, micro_batches: list[dict]) -> StepStats:
        """One optimizer step of both networks over this rank's share of the global batch."""
        values = self.schedules.at(step)
        frozen = self.schedules.last_layer_frozen(step)
        for name, learner in self.learners.items():
            learner.apply_schedule(values[f"lr.{name}"], values[f"wd.{name}"], frozen)
        stats = StepStats()
        for batch in micro_batches:
            self.micro_step(step, batch, values["teacher_temperature"], stats)
        self.check_grad_norms(step)
        for learner in self.learners.values():
            with phase("centers"):
                learner.centers.update()
            with phase("ema"):
                learner.update_teacher(values["teacher_momentum"])
        return stats

    def micro_step(self, step: int, batch: dict, teacher_temperature: float, stats: StepStats) -> None:
        crops = normalize_crops(batch["crops"], self.device, torch.float32, self.mean, self.std)
        teacher_outputs = {name: self.teacher_outputs(learner, crops[:2]) for name, learner in self.learners.items()}
        term_values = {}
        for name, learner in self.learners.items():
            partner = PARTNER[name]
            terms = network_losses(
                learner.engine, crops, teacher_outputs[name], teacher_outputs[partner],
                self.learners[partner].teacher, learner.centers, self.learners[partner].centers,
                teacher_temperature, self.config.mokd.student_temperature, learner.net_cfg.lambda_cross,
                compute_dtype=learner.dtype)
            total = faults.poison_loss(step, name, terms.total)
            # A non-finite loss only matters at engine.step(): its backward runs on every rank alike
            # (same collectives), so the ranks agree once per micro-batch, below, instead of once per network.
            with phase("student_backward"):
                learner.engine.backward(total)
            term_values[name] = torch.stack([t.detach().float() for t in terms._replace(total=total)])
            add_to(stats.terms, name, term_values[name])
            del terms, total  # free this network's graph before the partner's forward
        with phase("finite_check"):
            self.check_finite(term_values, step)  # before any engine.step(): no rank updates alone
        for learner in self.learners.values():
            with phase("optimizer"):
                learner.engine.step()  # applies the update only at the accumulation boundary
        with phase("centers"):
            for name, outputs in teacher_outputs.items():
                self.learners[name].centers.accumulate(outputs.proj, outputs.search)
                record_collapse(stats, name, outputs, self.learners[name].centers, teacher_temperature)
        stats.micro_batches += 1
        stats.images += crops[0].shape[0]
        stats.skipped += int(batch.get("skipped", 0))

    def teacher_outputs(self, learner: Learner, global_crops: list[torch.Tensor]) -> TeacherOutputs:
        learner.teacher.train()  # batch statistics in BatchNorm, like the student sees
        with phase("teacher_forward"):
            return teacher_forward(learner.teacher, global_crops, compute_dtype=learner.dtype)

    def check_finite(self, term_values: dict[str, torch.Tensor], step: int) -> None:
        """Agreed across ranks (one all-reduce, one host sync) before any engine.step(), so no rank
        updates or hangs alone."""
        names = list(term_values)
        bad = (~torch.isfinite(torch.stack([term_values[n] for n in names]))).any(dim=1).float()
        agreed = dist.all_reduce_max(bad).tolist()
        for name, flag in zip(names, agreed):
            if flag > 0:
                local = term_values[name].tolist()
                term = next((TERMS[i] for i, v in enumerate(local) if not math.isfinite(v)), "loss on another rank")
                raise NonFiniteLoss(name, term, step)

    def check_grad_norms(self, step: int) -> None:
        """DeepSpeed's global norm is already reduced over ranks, so every rank sees the same value."""
        for name, learner in self.learners.items():
            if not math.isfinite(learner.global_grad_norm()):
                raise NonFiniteLoss(name, "gradient norm", step)


def add_to(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


@torch.no_grad()
def record_collapse(stats: StepStats, name: str, outputs: TeacherOutputs, centers, temperature: float) -> None:
    """Teacher target entropy (→ 0: one-hot collapse) and the batch-mean target (→ uniform: uniform collapse)."""
    probs = torch.softmax((torch.cat(outputs.proj) - centers.proj) / temperature, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    add_to(stats.teacher_entropy, name, entropy.sum())
    add_to(stats.teacher_mean_probs, name, probs.sum(dim=0))
