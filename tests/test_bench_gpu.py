"""mokd-bench gpu on the CPU: one variant measured for real in its own process at tiny width, and
the parent's handling of variants that run out of memory, fail or find no time left."""
from __future__ import annotations

import sys

import pytest

from mokd_scale.tools.bench import gpu
from tests.test_bench import TINY

pytestmark = pytest.mark.integration


def test_one_variant_is_measured_in_its_own_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--config", "tiny_cpu", "--micro-batches", "4", "--variants", "eager", "--steps", "1", "--warmup", "1",
            "--threads", "1", "--matmul-size", "128", "--matmul-seconds", "0.1", "--out", str(tmp_path / "x.json"),
            "--set", *TINY]
    report = gpu.run_all(gpu.parse_gpu_args(argv), argv)
    (entry,) = report["variants"]
    assert entry["status"] == "ok", entry
    assert (entry["variant"], entry["micro_batch_size"], entry["zero_stage"]) == ("eager", 4, {"a": 2, "b": 2})
    assert "train.compile=false" in entry["overrides"] and "train.micro_batch_size=4" in entry["overrides"]
    assert entry["images_per_s"] == pytest.approx(4 / entry["seconds_per_step"])
    assert entry["mfu"] == pytest.approx(entry["model_flops_per_image"] * entry["images_per_s"]
                                         / entry["peak_matmul_flops_per_s"])
    assert 0 < entry["mfu"] <= 1 and entry["peak_memory_gib"] > 0 and entry["first_step_s"] > 0
    assert entry["host_ahead_share"] is None  # no CUDA kernels to time on a CPU
    assert report["device"].startswith("cpu") and "eager" in gpu.gpu_table(report)


def test_a_failed_or_out_of_memory_variant_keeps_the_others():
    args = gpu.parse_gpu_args(["--micro-batches", "32,64,128", "--budget", "100"])
    measured = {"status": "ok", "device": "cuda (X)", "images_per_s": 1.0, "seconds_per_step": 32.0, "mfu": 0.1,
                "peak_memory_gib": 1.0, "host_ahead_share": 0.5, "first_step_s": 1.0, "dtype": "bfloat16"}
    outcomes = {("compile", 32): {"status": "oom", "error": "CUDA out of memory"},
                ("eager", 64): {"status": "failed", "error": "boom"}}

    def fake_process(command, out, timeout):
        variant, micro_batch = command[command.index("--only") + 1].split(":")
        assert command[-2:] == ["--out", out] and 0 < timeout <= 100
        return outcomes.get((variant, int(micro_batch)), measured)

    report = gpu.run_all(args, ["--micro-batches", "32,64,128", "--out", "elsewhere.json"], fake_process)
    # The recipe's micro-batch in both variants first, then the eager curve, then the compiled one.
    assert [(r["variant"], r["micro_batch_size"], r["status"]) for r in report["variants"]] == [
        ("eager", 32, "ok"), ("compile", 32, "oom"), ("eager", 64, "failed"), ("eager", 128, "ok"),
        ("compile", 64, "ok"), ("compile", 128, "ok")]
    assert report["device"] == "cuda (X)"
    table = gpu.gpu_table(report)
    assert "oom: CUDA out of memory" in table and "failed: boom" in table and table.count(" ok") == 4
    skipped = gpu.run_all(gpu.parse_gpu_args(["--budget", str(gpu.MIN_VARIANT_S - 1)]), [], fake_process)
    assert {r["status"] for r in skipped["variants"]} == {"skipped"} and len(skipped["variants"]) == 6


def test_a_process_that_runs_out_of_memory_is_reported_as_such(tmp_path):
    script = "import sys; sys.stderr.write('torch.OutOfMemoryError: CUDA out of memory. Tried...\\n'); sys.exit(1)"
    result = gpu.run_variant_process([sys.executable, "-c", script], str(tmp_path / "none.json"), 60)
    assert result["status"] == "oom" and "out of memory" in result["error"]
    result = gpu.run_variant_process([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "none.json"), 60)
    assert result["status"] == "failed"
