"""Logged metrics: console line, TensorBoard scalars, and OUTPUT/metrics.jsonl.

Per-step sums are reduced across ranks only at log steps (one all-reduce), so the logged
losses are global-batch means whatever the number of ranks.

metrics.jsonl keeps flat keys (`a.loss`, `knn.b.top1`, `lr.a`, `images_per_s`); TensorBoard groups the
same values by kind (tensorboard_tag): train/a/loss, knn/b/top1, sched/lr_a, perf/images_per_s.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mokd_scale.runtime import dist
from mokd_scale.config import NETWORKS

if TYPE_CHECKING:  # the trainer's modules (DeepSpeed) stay out of light importers such as mokd-bench science
    from mokd_scale.train.step import StepStats

SCHEDULED = ("lr", "wd", "teacher_momentum", "teacher_temperature")
PERFORMANCE = ("images_per_s", "seconds_per_step", "peak_memory_gib")


def tensorboard_tag(key: str) -> str:
    """metrics.jsonl key -> grouped TensorBoard tag (README, "Metrics", has the table)."""
    parts = key.split(".")
    if parts[0] in NETWORKS:
        return "/".join(["train", *parts])  # a.self_proj -> train/a/self_proj
    if parts[0] == "knn":
        return "/".join(parts)  # knn.a.top1 -> knn/a/top1
    if parts[0] in SCHEDULED:
        return "sched/" + "_".join(parts)  # lr.a -> sched/lr_a
    if key in PERFORMANCE:
        return f"perf/{key}"
    if key == "skipped_samples":
        return f"data/{key}"
    return "/".join(parts)


class StepAccumulator:
    """Sums StepStats between two log lines on this rank."""

    def __init__(self, out_dim: int, device: torch.device, term_names: tuple[str, ...]):
        self.out_dim = out_dim
        self.device = device
        self.term_names = term_names
        self.reset()

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.terms = {n: zeros(len(self.term_names)) for n in NETWORKS}
        self.entropy = {n: zeros(1) for n in NETWORKS}
        self.mean_probs = {n: zeros(self.out_dim) for n in NETWORKS}
        self.grad_norm = {n: 0.0 for n in NETWORKS}
        self.micro_batches = self.images = self.skipped = self.steps = 0
        self.started = time.monotonic()

    def add(self, stats: StepStats) -> None:
        """Device-side sums: no host synchronisation per step."""
        for name in stats.terms:
            self.terms[name] += stats.terms[name].double()
            self.entropy[name] += stats.teacher_entropy[name].double()
            self.mean_probs[name] += stats.teacher_mean_probs[name].double()
            self.grad_norm[name] += stats.grad_norm.get(name, 0.0)
        self.micro_batches += stats.micro_batches
        self.images += stats.images
        self.skipped += stats.skipped
        self.steps += 1

    def reduce(self) -> dict[str, float]:
        """Global means over all ranks and steps since the last reset. A collective."""
        terms_count = len(self.term_names)
        counts = torch.tensor([self.micro_batches, self.images, self.skipped], dtype=torch.float64, device=self.device)
        packed = torch.cat([*(self.terms[n] for n in NETWORKS), *(self.entropy[n] for n in NETWORKS),
                            *(self.mean_probs[n] for n in NETWORKS), counts])
        values = dist.all_reduce_sum(packed).cpu()
        micro, images, skipped = values[-3:].tolist()
        terms = values[:len(NETWORKS) * terms_count].view(len(NETWORKS), terms_count) / max(micro, 1)
        entropy = values[len(NETWORKS) * terms_count:][:len(NETWORKS)]
        probs = values[len(NETWORKS) * (terms_count + 1):-3].view(len(NETWORKS), self.out_dim)
        out = {f"{n}.{t}": terms[i, j].item() for i, n in enumerate(NETWORKS) for j, t in enumerate(self.term_names)}
        views = max(2 * images, 1)  # two global views per image reach the teacher
        log_k = math.log(self.out_dim)
        for i, name in enumerate(NETWORKS):
            out[f"{name}.teacher_entropy_ratio"] = entropy[i].item() / views / log_k
            mean = probs[i] / views
            out[f"{name}.teacher_kl_uniform"] = float((mean * torch.log(mean.clamp_min(1e-12) * self.out_dim)).sum())
            # The same on every rank: the gradient norms are reduced before they are read.
            out[f"{name}.grad_norm"] = self.grad_norm[name] / max(self.steps, 1)
        elapsed = max(time.monotonic() - self.started, 1e-9)
        out["images_per_s"] = images / elapsed
        out["skipped_samples"] = skipped
        out["seconds_per_step"] = elapsed / max(self.steps, 1)
        return out


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsWriter:
    """Rank 0 writes; other ranks hold a writer that does nothing."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.jsonl = None
        self.tensorboard = None
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(tensorboard_tag(key), value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def console_line(step: int, total: int, values: dict[str, float], eta_seconds: float) -> str:
    parts = [f"step {step}/{total}"]
    for name in NETWORKS:
        terms = [key.split(".", 1)[1] for key in values if key.startswith(f"{name}.") and key.split(".", 1)[1] in
                 ("self_proj", "self_search", "cross_proj", "cross_search")]
        shown = " ".join(f"{ABBREVIATIONS[t]} {values[f'{name}.{t}']:.4f}" for t in terms)
        parts.append(f"{name}: loss {values[f'{name}.loss']:.4f} [{shown}] lr {values.get(f'lr.{name}', 0):.2e} "
                     f"tT {values.get(f'teacher_temperature.{name}', 0):.3f} "
                     f"H/lnK {values[f'{name}.teacher_entropy_ratio']:.3f}")
    parts.append(f"m {values.get('teacher_momentum', 0):.5f}")
    parts.append(f"{values['images_per_s']:.1f} img/s ETA {format_duration(eta_seconds)}")
    parts.append(f"mem {values.get('peak_memory_gib', 0):.2f} GiB skipped {int(values['skipped_samples'])}")
    return " | ".join(parts)


ABBREVIATIONS = {"self_proj": "sp", "self_search": "ss", "cross_proj": "cp", "cross_search": "cs"}


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
