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
    """Half-cosine from start (step 0) towards end, DINO's shape: step i of n is
    end + (start - end) * (1 + cos(pi * i / n)) / 2, so the last step is just short of end."""
    t = np.arange(max(steps, 0)) / max(steps, 1)
    return end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))


def warmup_then_cosine(peak: float, final: float, total_steps: int, warmup_steps: int) -> np.ndarray:
    """Linear warm-up from 0 to peak (both ends included, as DINO), then cosine(peak, final)."""
    warmup_steps = min(warmup_steps, total_steps)
    return np.concatenate([np.linspace(0.0, peak, warmup_steps), cosine(peak, final, total_steps - warmup_steps)])


def epoch_warmup(start: float, final: float, warmup_epochs: int, steps_per_epoch: int, total_steps: int) -> np.ndarray:
    """Constant within an epoch: epoch e < warmup_epochs takes the e-th of warmup_epochs evenly spaced
    values from start to final (both included), later epochs take final. This is how DINO and the
    authors warm the teacher temperature up."""
    epochs = np.arange(total_steps) // max(steps_per_epoch, 1)
    if warmup_epochs < 1:
        return np.full(total_steps, float(final))
    per_epoch = np.linspace(start, final, warmup_epochs)
    return np.where(epochs < warmup_epochs, per_epoch[np.minimum(epochs, warmup_epochs - 1)], final)


def epochs_to_steps(epochs: float, config: Config) -> int:
    return int(round(epochs * steps_per_epoch(config)))


@dataclass(frozen=True)
class NetworkSchedule:
    lr: np.ndarray
    weight_decay: np.ndarray
    teacher_temperature: np.ndarray  # of this network's loss terms


@dataclass(frozen=True)
class NetworkValues:
    """One network's scheduled values at one step."""
    lr: float
    weight_decay: float
    teacher_temperature: float


# The metrics.jsonl name of each NetworkValues field (`lr.a`, `wd.a`, `teacher_temperature.a`).
LOG_NAMES = {"lr": "lr", "weight_decay": "wd", "teacher_temperature": "teacher_temperature"}


@dataclass(frozen=True)
class StepValues:
    """Every scheduled value of one optimizer step."""
    teacher_momentum: float
    last_layer_frozen: bool
    networks: dict[str, NetworkValues]

    def log_items(self) -> dict[str, float]:
        """Flat metrics.jsonl keys: teacher_momentum, then each network's values."""
        items = {"teacher_momentum": self.teacher_momentum}
        for name, values in self.networks.items():
            items.update({f"{key}.{name}": getattr(values, field) for field, key in LOG_NAMES.items()})
        return items


@dataclass(frozen=True)
class Schedules:
    networks: dict[str, NetworkSchedule]
    teacher_momentum: np.ndarray
    freeze_last_layer_steps: int

    @staticmethod
    def build(config: Config) -> "Schedules":
        total = config.train.steps
        mokd = config.mokd
        networks = {name: network_schedule(net, config) for name, net in config.networks.items()}
        momentum = cosine(mokd.teacher_momentum, mokd.teacher_momentum_end, total)
        return Schedules(networks, momentum, epochs_to_steps(config.train.freeze_last_layer_epochs, config))

    def at(self, step: int) -> StepValues:
        """The values of one step (clamped to the last step)."""
        i = min(step, len(self.teacher_momentum) - 1)
        return StepValues(float(self.teacher_momentum[i]), step < self.freeze_last_layer_steps,
                          {name: NetworkValues(float(s.lr[i]), float(s.weight_decay[i]), float(s.teacher_temperature[i]))
                           for name, s in self.networks.items()})


def network_schedule(net: NetworkConfig, config: Config) -> NetworkSchedule:
    total = config.train.steps
    scale = config.train.global_batch_size / 256.0  # linear scaling rule
    lr = warmup_then_cosine(net.lr * scale, net.min_lr, total, epochs_to_steps(config.train.warmup_epochs, config))
    weight_decay = cosine(net.weight_decay, net.weight_decay_end, total)
    mokd = config.mokd
    temperature = epoch_warmup(mokd.warmup_teacher_temperature, mokd.teacher_temperature,
                               net.warmup_teacher_temperature_epochs, steps_per_epoch(config), total)
    return NetworkSchedule(lr, weight_decay, temperature)
