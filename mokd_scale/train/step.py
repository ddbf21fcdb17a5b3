"""The MOKD step over two Learners (docs/design.md: the step, invariant 5).

Per micro-batch: both teachers forward on the global crops (no grad) → A's student forward,
A's losses, A's backward → the same for B. Only one student's activations are alive at a
time; what passes between the networks (teacher outputs, queries) is detached.
At the end of the optimizer step: both engines update (their GradientGate clips per tensor and
refuses non-finite gradients on every rank alike), both teachers take an EMA step, both pairs of
centres take their global-batch update.

In `independent` mode each network learns from its own teacher's projection targets only
(plain DINO): the same loop with no partner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from mokd_scale.runtime import faults
from mokd_scale.config import PARTNER, Config
from mokd_scale.data import normalize_crops
from mokd_scale.engine.learner import Learner
from mokd_scale.method.terms import TeacherOutputs, loss_terms, network_losses, teacher_forward
from mokd_scale.runtime.profiling import phase
from mokd_scale.train.schedules import Schedules



class NonFiniteLoss(RuntimeError):
    """A loss or gradient was NaN/inf on some rank; every rank raises it together."""

    def __init__(self, network: str, term: str, step: int):
        super().__init__(f"non-finite {term} in network {network} at step {step}")
        self.network, self.term, self.step = network, term, step


@dataclass
class StepStats:
    """Per-step sums on this rank, kept on the device: reading them every micro-batch would stall
    the host on the GPU. They are reduced across ranks and read only when a line is logged."""
    term_names: tuple[str, ...]  # the loss terms, then "loss"
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # network → (len(term_names),) sums
    teacher_entropy: dict[str, torch.Tensor] = field(default_factory=dict)  # network → scalar sum
    teacher_mean_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # network → (K,) sum
    grad_norm: dict[str, float] = field(default_factory=dict)  # network → global norm before clipping
    micro_batches: int = 0
    images: int = 0
    skipped: int = 0

    def term(self, network: str, term: str) -> float:
        return float(self.terms[network][self.term_names.index(term)])


class Coordinator:
    def __init__(self, config: Config, learners: dict[str, Learner], schedules: Schedules, device: torch.device):
        self.config = config
        self.learners = learners
        self.schedules = schedules
        self.device = device
        self.mean = config.data.mean
        self.std = config.data.std
        self.independent = config.mokd.mode == "independent"
        self.term_names = (*loss_terms(config.mokd.mode), "loss")

    def train_step(self, step: int, micro_batches: list[dict]) -> StepStats:
        """One optimizer step of both networks over this rank's share of the global batch."""
        values = self.schedules.at(step)
        frozen = self.schedules.last_layer_frozen(step)
        for name, learner in self.learners.items():
            learner.apply_schedule(values, PARTNER[name], frozen)
        stats = StepStats(self.term_names)
        for batch in micro_batches:
            self.micro_step(batch, values, stats, step)
        self.check_gradients(step, stats)
        for name, learner in self.learners.items():
            stats.grad_norm[name] = learner.gradients.global_norm
            with phase("centers"):
                learner.centers.update()
            with phase("ema"):
                learner.update_teacher(values["teacher_momentum"])
        return stats

    def micro_step(self, batch: dict, values: dict[str, float], stats: StepStats, step: int) -> None:
        crops = normalize_crops(batch["crops"], self.device, torch.float32, self.mean, self.std)
        teacher_outputs = {name: self.teacher_outputs(learner, crops[:2]) for name, learner in self.learners.items()}
        for name, learner in self.learners.items():
            partner = None if self.independent else PARTNER[name]
            terms = network_losses(
                learner.engine, crops, teacher_outputs[name], teacher_outputs.get(partner),
                self.learners[partner].teacher if partner else None, learner.centers,
                self.learners[partner].centers if partner else None, values[f"teacher_temperature.{name}"],
                self.config.mokd.student_temperature, learner.net_cfg.lambda_cross, compute_dtype=learner.dtype)
            total = faults.poison_loss(step, name, terms.total)
            with phase("student_backward"):
                learner.engine.backward(total)
            logged = [getattr(terms, term) for term in self.term_names[:-1]] + [total]
            add_to(stats.terms, name, torch.stack([t.detach().float() for t in logged]))
            del terms, total, logged  # free this network's graph before the partner's forward
        for learner in self.learners.values():
            with phase("optimizer"):
                learner.step()  # updates only at the accumulation boundary
        with phase("centers"):
            for name, outputs in teacher_outputs.items():
                self.learners[name].centers.accumulate(outputs.proj, outputs.search)
                record_collapse(stats, name, outputs, self.learners[name].centers,
                                values[f"teacher_temperature.{name}"])
        stats.micro_batches += 1
        stats.images += crops[0].shape[0]
        stats.skipped += int(batch.get("skipped", 0))

    def teacher_outputs(self, learner: Learner, global_crops: list[torch.Tensor]) -> TeacherOutputs:
        learner.teacher.train()  # batch statistics in BatchNorm, like the student sees
        with phase("teacher_forward"):
            return teacher_forward(learner.teacher, global_crops, compute_dtype=learner.dtype)

    def check_gradients(self, step: int, stats: StepStats) -> None:
        """Each GradientGate has refused the update of a non-finite gradient, with the same verdict
        on every rank (its norms are reduced over ranks); name the culprit term where this rank saw it."""
        for name, learner in self.learners.items():
            if learner.gradients.non_finite:
                raise NonFiniteLoss(name, self.non_finite_term(stats, name), step)

    def non_finite_term(self, stats: StepStats, name: str) -> str:
        local = stats.terms[name].tolist()
        bad = [term for term, value in zip(self.term_names, local) if not math.isfinite(value)]
        return bad[0] if bad else "gradient (loss finite on this rank)"


def add_to(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


@torch.no_grad()
def record_collapse(stats: StepStats, name: str, outputs: TeacherOutputs, centers, temperature: float) -> None:
    """Teacher target entropy (→ 0: one-hot collapse) and the batch-mean target (→ uniform: uniform collapse)."""
    proj = outputs.proj.reshape(-1, outputs.proj.shape[-1])
    probs = torch.softmax((proj - centers.proj) / temperature, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
    add_to(stats.teacher_entropy, name, entropy.sum())
    add_to(stats.teacher_mean_probs, name, probs.sum(dim=0))
