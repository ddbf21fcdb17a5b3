"""Logged metrics: console line, TensorBoard scalars, and OUTPUT/metrics.jsonl.

Per-step sums are reduced across ranks only at log steps (one all-reduce), so the logged
losses are global-batch means whatever the number of ranks.

metrics.jsonl keeps flat keys (`a.loss`, `knn.b.top1`, `lr.a`, `images_per_s`); TensorBoard groups the
same values by kind (tensorboard_tag): train/a/loss, knn/b/top1, sched/lr_a, perf/images_per_s. The
loss-term keys (`a.self_proj`, ...) and the console's abbreviations come from the term registry
(mokd_scale/method/terms.py).

The step (train/step.py) hands each micro-batch's terms and teacher targets to a StepRecord; the
collapse diagnostics and every sum are computed here.
"""
from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mokd_scale.method.terms import TERMS
from mokd_scale.runtime import dist
from mokd_scale.runtime.profiling import phase

if TYPE_CHECKING:
    from mokd_scale.method.centers import Centers
    from mokd_scale.method.forward import TeacherOutputs
    from mokd_scale.method.objective import TermValues

SCHEDULED = ("lr", "wd", "teacher_momentum", "teacher_temperature")
PERFORMANCE = ("images_per_s", "seconds_per_step", "peak_memory_gib")


def tensorboard_tag(key: str, networks) -> str:
    """metrics.jsonl key -> grouped TensorBoard tag (README, "Metrics", has the table); `networks`: the
    run's network names."""
    parts = key.split(".")
    if parts[0] in networks and len(parts) > 2 and parts[1] == "grad":
        return "/".join(["grad", parts[0], *parts[2:]])  # a.grad.self_proj -> grad/a/self_proj
    if parts[0] in networks:
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


class StepRecord:
    """What one optimizer step leaves for the log, on this rank. Sums stay on the device: reading them
    every micro-batch would stall the host on the GPU; they are reduced across ranks and read only when a
    line is logged."""

    def __init__(self, term_names: tuple[str, ...]):
        self.term_names = (*term_names, "loss")
        self.terms: dict[str, torch.Tensor] = {}  # network -> (len(term_names),) sums
        self.teacher_entropy: dict[str, torch.Tensor] = {}  # network -> scalar sum
        self.teacher_mean_probs: dict[str, torch.Tensor] = {}  # network -> (K,) sum
        self.grad_norm: dict[str, float] = {}  # network -> global norm before clipping
        # Measuring steps only (train.term_gradients_every): network -> {term: norm at the backbone}, and
        # network -> fraction of its backbone tensors clipped.
        self.term_gradients: dict[str, dict[str, float]] = {}
        self.clipped_fraction: dict[str, float | None] = {}
        self.micro_batches = self.images = self.skipped = 0

    def add_terms(self, name: str, terms: TermValues) -> None:
        values = [terms.values[term] for term in self.term_names[:-1]] + [terms.total]
        add_to(self.terms, name, torch.stack([value.detach().float() for value in values]))

    @torch.no_grad()
    def add_targets(self, name: str, targets: TeacherOutputs, centers: Centers, temperature: float) -> None:
        """Collapse diagnostics: the teacher's target entropy (-> 0: one-hot collapse) and its batch-mean
        target (-> uniform: uniform collapse)."""
        with phase("metrics"):
            proj = targets.proj.reshape(-1, targets.proj.shape[-1])
            probs = torch.softmax((proj - centers.proj) / temperature, dim=-1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=-1)
            add_to(self.teacher_entropy, name, entropy.sum())
            add_to(self.teacher_mean_probs, name, probs.sum(dim=0))

    def add_batch(self, images: int, skipped: int) -> None:
        self.micro_batches += 1
        self.images += images
        self.skipped += skipped

    def gradient_items(self) -> dict[str, float]:
        """A measuring step's metrics.jsonl keys: `a.grad.self_proj`, ..., `a.grad.clipped_fraction`."""
        items = {f"{name}.grad.{term}": norm for name, norms in self.term_gradients.items() for term, norm in norms.items()}
        items.update({f"{name}.grad.clipped_fraction": fraction for name, fraction in self.clipped_fraction.items()
                      if fraction is not None})
        return items

    def term(self, network: str, term: str) -> float:
        return float(self.terms[network][self.term_names.index(term)])

    def first_non_finite_term(self, network: str) -> str:
        """The term that went bad on this rank, to name it when the run stops."""
        local = self.terms[network].tolist()
        bad = [term for term, value in zip(self.term_names, local) if not math.isfinite(value)]
        return bad[0] if bad else "gradient (loss finite on this rank)"


def add_to(sums: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


class StepAccumulator:
    """Sums StepRecords between two log lines on this rank."""

    def __init__(self, out_dim: int, device: torch.device, term_names: tuple[str, ...], networks: tuple[str, ...]):
        self.out_dim = out_dim
        self.device = device
        self.term_names = (*term_names, "loss")
        self.networks = tuple(networks)
        self.reset()

    def reset(self) -> None:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.device)  # noqa: E731
        self.terms = {n: zeros(len(self.term_names)) for n in self.networks}
        self.entropy = {n: zeros(1) for n in self.networks}
        self.mean_probs = {n: zeros(self.out_dim) for n in self.networks}
        self.grad_norm = {n: 0.0 for n in self.networks}
        self.micro_batches = self.images = self.skipped = self.steps = 0
        self.started = time.monotonic()

    def add(self, record: StepRecord) -> None:
        """Device-side sums: no host synchronisation per step."""
        for name in record.terms:
            self.terms[name] += record.terms[name].double()
            self.entropy[name] += record.teacher_entropy[name].double()
            self.mean_probs[name] += record.teacher_mean_probs[name].double()
            self.grad_norm[name] += record.grad_norm.get(name, 0.0)
        self.micro_batches += record.micro_batches
        self.images += record.images
        self.skipped += record.skipped
        self.steps += 1

    def reduce(self) -> dict[str, float]:
        """Global means over all ranks and steps since the last reset. A collective."""
        n, terms_count = len(self.networks), len(self.term_names)
        counts = torch.tensor([self.micro_batches, self.images, self.skipped], dtype=torch.float64, device=self.device)
        packed = torch.cat([*(self.terms[k] for k in self.networks), *(self.entropy[k] for k in self.networks),
                            *(self.mean_probs[k] for k in self.networks), counts])
        values = dist.all_reduce_sum(packed).cpu()
        micro, images, skipped = values[-3:].tolist()
        terms = values[:n * terms_count].view(n, terms_count) / max(micro, 1)
        entropy = values[n * terms_count:][:n]
        probs = values[n * (terms_count + 1):-3].view(n, self.out_dim)
        out = {f"{k}.{t}": terms[i, j].item() for i, k in enumerate(self.networks) for j, t in enumerate(self.term_names)}
        views = max(2 * images, 1)  # two global views per image reach the teacher
        log_k = math.log(self.out_dim)
        for i, name in enumerate(self.networks):
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

    def __init__(self, output_dir: Path, enabled: bool, networks: tuple[str, ...]):
        self.enabled = enabled
        self.networks = tuple(networks)
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
                self.tensorboard.add_scalar(tensorboard_tag(key, self.networks), value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


def console_line(step: int, total: int, values: dict[str, float], eta_seconds: float,
                 networks: tuple[str, ...]) -> str:
    parts = [f"step {step}/{total}"]
    for name in networks:
        shown = " ".join(f"{term.abbreviation} {values[f'{name}.{key}']:.4f}" for key, term in TERMS.items()
                         if f"{name}.{key}" in values)
        parts.append(f"{name}: loss {values[f'{name}.loss']:.4f} [{shown}] lr {values.get(f'lr.{name}', 0):.2e} "
                     f"tT {values.get(f'teacher_temperature.{name}', 0):.3f} "
                     f"H/lnK {values[f'{name}.teacher_entropy_ratio']:.3f}")
    parts.append(f"m {values.get('teacher_momentum', 0):.5f}")
    parts.append(f"{values['images_per_s']:.1f} img/s ETA {format_duration(eta_seconds)}")
    parts.append(f"mem {values.get('peak_memory_gib', 0):.2f} GiB skipped {int(values['skipped_samples'])}")
    return " | ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
