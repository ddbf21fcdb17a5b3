"""One optimizer step of every network (docs/design.md: the step, invariant 5).

Per micro-batch: every teacher runs on the global crops (no grad); then, one network at a time, its
student forward, its loss terms against its own and its partners' teacher sides, its backward (only one
student's activations are alive at a time; what passes between networks is detached). At the end of the
optimizer step: every engine updates (its GradientGate clips per tensor and refuses a non-finite gradient
on every rank alike), then each network's centres take their global-batch update and its teacher its
EMA step. What the step leaves for the log goes into a StepRecord (train/metrics.py).

Every `train.term_gradients_every` steps (a measuring step), each network's weighted terms on the first
micro-batch are differentiated one by one at its backbone, from a replay of its forward just before the
real one (engine/term_gradients.py), and its gradient gate counts the backbone tensors it clips.
"""
from __future__ import annotations

import torch

from mokd_scale.data import normalize_crops
from mokd_scale.engine.learner import Learner
from mokd_scale.method.objective import Objective
from mokd_scale.runtime import faults
from mokd_scale.train.metrics import StepRecord
from mokd_scale.train.schedules import Schedules


class NonFiniteLoss(RuntimeError):
    """A loss or gradient was NaN/inf on some rank; every rank raises it together."""

    def __init__(self, network: str, term: str, step: int):
        super().__init__(f"non-finite {term} in network {network} at step {step}")
        self.network, self.term, self.step = network, term, step


class Step:
    def __init__(self, learners: dict[str, Learner], objective: Objective, schedules: Schedules, config):
        self.learners, self.objective, self.schedules = learners, objective, schedules
        self.mean, self.std = config.data.mean, config.data.std
        self.device = next(iter(learners.values())).device
        self.term_gradients_every = config.train.term_gradients_every

    def __call__(self, step: int, micro_batches: list[dict]) -> StepRecord:
        """One optimizer step of every network over this rank's share of the global batch."""
        values = self.schedules.at(step)
        record = StepRecord(self.objective.term_names)
        measuring = self.term_gradients_every > 0 and step % self.term_gradients_every == 0
        for learner in self.learners.values():
            learner.begin_step(values, measuring)
        for micro, batch in enumerate(micro_batches):
            crops = normalize_crops(batch["crops"], self.device, torch.float32, self.mean, self.std)
            sides = {name: learner.teacher_side(crops[:2]) for name, learner in self.learners.items()}
            for index, (name, learner) in enumerate(self.learners.items()):
                temperature = values.networks[name].teacher_temperature
                if measuring and micro == 0:
                    record.term_gradients[name] = self.term_gradients(name, learner, crops, sides, temperature)
                terms = self.objective(name, learner.student_outputs(crops), sides, temperature, learner.dtype)
                learner.backward(faults.poison_loss(step, index, terms.total))
                record.add_terms(name, terms)
                del terms  # free this network's graph before the next network's forward
            for learner in self.learners.values():
                learner.step()  # updates only at the accumulation boundary
            for name, learner in self.learners.items():
                learner.accumulate_centers(sides[name].targets)
                record.add_targets(name, sides[name].targets, learner.centers, values.networks[name].teacher_temperature)
            record.add_batch(crops[0].shape[0], int(batch.get("skipped", 0)))
        self.stop_if_non_finite(step, record)
        for name, learner in self.learners.items():
            record.grad_norm[name] = learner.gradients.global_norm
            if measuring:
                record.clipped_fraction[name] = learner.gradients.clipped_fraction
            learner.end_step(values.teacher_momentum)
        return record

    def term_gradients(self, name: str, learner: Learner, crops, sides, temperature: float) -> dict[str, float]:
        """Network `name`'s weighted terms on these crops, each differentiated alone at its backbone."""
        return learner.term_gradient_norms(crops, lambda outputs: self.objective.contributions(
            name, self.objective(name, outputs, sides, temperature, learner.dtype).values))

    def stop_if_non_finite(self, step: int, record: StepRecord) -> None:
        """Each GradientGate has refused the update of a non-finite gradient, with the same verdict on every
        rank (its norms are reduced over ranks); name the culprit term where this rank saw it."""
        for name, learner in self.learners.items():
            if learner.gradients.non_finite:
                raise NonFiniteLoss(name, record.first_non_finite_term(name), step)
