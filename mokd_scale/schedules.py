"""Per-step schedules (lr, weight decay, EMA momentum, teacher temperature).

Every schedule is an array indexed by the global optimizer step, never by a data-epoch
counter, so a resumed run or a run on a different number of ranks sees the same values.
"Epochs" in the recipe are converted to steps with steps_per_epoch = samples_per_epoch /
global_batch_size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mokd_scale.config import Config, NetworkConfig, steps_per_epoch


def cosine(start: float, end: float, steps: int) -> np.ndarray:
    """Half-cosine from start (step 0) to end (last step)."""
    if steps <= 0:
        return np.zeros(0)
    t = np.arange(steps) / max(1, steps - 1)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))


def warmup_then_cosine(peak: float, final: float, total_steps: int, warmup_steps: int,
                       warmup_start: float = 0.0) -> np.ndarray:
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, peak, warmup_steps, endpoint=False)
    return np.concatenate([warmup, cosine(peak, final, total_steps - warmup_steps)])


def warmup_then_constant(start: float, final: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start, final, warmup_steps, endpoint=False)
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, final)])


def epochs_to_steps(epochs: float, config: Config) -> int:
    return int(round(epochs * steps_per_epoch(config)))


@dataclass(frozen=True)
class NetworkSchedule:
    lr: np.ndarray
    weight_decay: np.ndarray


@dataclass(frozen=True)
class Schedules:
    networks: dict[str, NetworkSchedule]
    teacher_momentum: np.ndarray
    teacher_temperature: np.ndarray
    freeze_last_layer_steps: int

    @staticmethod
    def build(config: Config) -> "Schedules":
        total = config.train.steps
        mokd = config.mokd
        networks = {name: network_schedule(getattr(config.networks, name), config) for name in ("a", "b")}
        momentum = cosine(mokd.teacher_momentum, mokd.teacher_momentum_end, total)
        temperature = warmup_then_constant(mokd.warmup_teacher_temperature, mokd.teacher_temperature, total,
                                           epochs_to_steps(mokd.warmup_teacher_temperature_epochs, config))
        return Schedules(networks, momentum, temperature,
                         epochs_to_steps(config.train.freeze_last_layer_epochs, config))

    def at(self, step: int) -> dict[str, float]:
        """All values for one step (clamped to the last step), flat, for logging."""
        i = min(step, len(self.teacher_momentum) - 1)
        values = {"teacher_momentum": float(self.teacher_momentum[i]),
                  "teacher_temperature": float(self.teacher_temperature[i])}
        for name, schedule in self.networks.items():
            values[f"lr.{name}"] = float(schedule.lr[i])
            values[f"wd.{name}"] = float(schedule.weight_decay[i])
        return values

    def last_layer_frozen(self, step: int) -> bool:
        return step < self.freeze_last_layer_steps


def network_schedule(net: NetworkConfig, config: Config) -> NetworkSchedule:
    total = config.train.steps
    scale = config.train.global_batch_size / 256.0  # linear scaling rule
    lr = warmup_then_cosine(net.lr * scale, net.min_lr, total, epochs_to_steps(config.train.warmup_epochs, config))
    weight_decay = cosine(net.weight_decay, net.weight_decay_end, total)
    return NetworkSchedule(lr, weight_decay)
