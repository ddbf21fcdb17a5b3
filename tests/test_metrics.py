import json
import math

import pytest
import torch

from mokd_scale.train.metrics import MetricsWriter, StepAccumulator, StepRecord, console_line

MOKD = ("self_proj", "self_search", "cross_proj", "cross_search")
TERMS = (*MOKD, "loss")


def stats_with(loss_a: float, probs: torch.Tensor, images: int, skipped: int = 0) -> StepRecord:
    """One micro-batch whose teacher gave `probs` (rows) for 2 * images global views."""
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=-1)
    stats = StepRecord(MOKD)
    stats.add_batch(images, skipped)
    for name in "ab":
        stats.terms[name] = torch.full((len(TERMS),), loss_a if name == "a" else 2.0)
        stats.teacher_entropy[name] = entropy.sum()
        stats.teacher_mean_probs[name] = probs.sum(dim=0)
        stats.grad_norm[name] = 4.0 * loss_a
    return stats


def test_accumulator_means_and_collapse_diagnostics():
    k, images = 8, 3
    uniform = torch.full((2 * images, k), 1.0 / k)
    one_hot = torch.nn.functional.one_hot(torch.zeros(2 * images, dtype=torch.long), k).float()
    meter = StepAccumulator(k, torch.device("cpu"), MOKD, ("a", "b"))
    meter.add(stats_with(1.0, uniform, images, skipped=2))
    meter.add(stats_with(3.0, uniform, images))
    values = meter.reduce()
    assert values["a.loss"] == pytest.approx(2.0) and values["b.self_proj"] == pytest.approx(2.0)
    assert values["a.teacher_entropy_ratio"] == pytest.approx(1.0)  # uniform targets: H = ln K
    assert values["a.teacher_kl_uniform"] == pytest.approx(0.0, abs=1e-9)
    assert values["skipped_samples"] == 2 and values["images_per_s"] > 0
    assert values["a.grad_norm"] == pytest.approx(8.0)  # mean over the two steps
    meter.reset()
    meter.add(stats_with(1.0, one_hot, images))
    collapsed = meter.reduce()
    assert collapsed["a.teacher_entropy_ratio"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["a.teacher_kl_uniform"] == pytest.approx(math.log(k))  # all mass on one prototype


def test_writer_appends_json_lines_and_grouped_tensorboard_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, enabled=True, networks=("a", "b"))
    writer.write(1, {"a.loss": 1.5, "b.self_proj": 0.5, "images_per_s": 10.0, "lr.a": 1e-3, "teacher_momentum": 0.99,
                     "skipped_samples": 0})
    writer.write(2, {"a.loss": 1.25, "images_per_s": 11.0, "knn.b.top1": 42.0, "teacher_temperature.b": 0.05})
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1] == {"step": 2, "a.loss": 1.25, "images_per_s": 11.0, "knn.b.top1": 42.0, "teacher_temperature.b": 0.05}
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["data/skipped_samples", "knn/b/top1", "perf/images_per_s",
                                                "sched/lr_a", "sched/teacher_momentum", "sched/teacher_temperature_b",
                                                "train/a/loss",
                                                "train/b/self_proj"]
    assert [(e.step, e.value) for e in events.Scalars("train/a/loss")] == [(1, 1.5), (2, 1.25)]
    assert not MetricsWriter(tmp_path / "off", enabled=False, networks=("a", "b")).enabled and not (tmp_path / "off").exists()


def test_console_line_shows_progress_losses_and_eta():
    values = {f"{n}.{t}": 1.0 for n in "ab" for t in TERMS}
    values.update({"a.teacher_entropy_ratio": 0.5, "b.teacher_entropy_ratio": 0.5, "images_per_s": 12.5,
                   "skipped_samples": 3, "lr.a": 1e-3, "peak_memory_gib": 1.5})
    line = console_line(40, 400, values, eta_seconds=3725, networks=("a", "b"))
    assert "step 40/400" in line and "12.5 img/s" in line and "ETA 1h02m" in line and "skipped 3" in line
    assert "cs 1.0000" in line
    independent = {k: v for k, v in values.items() if not k.endswith(("search", "cross_proj"))}
    assert "cs " not in console_line(40, 400, independent, eta_seconds=1, networks=("a", "b")) and "sp 1.0000" in line
