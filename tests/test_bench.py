"""mokd-bench step / memory end to end on tiny settings: the JSON has the documented fields and
values that can only come out of a working measurement. No timing assertions (shared CPUs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY = ["train.micro_batch_size=4", "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
        "data.global_crop_size=16", "data.local_crop_size=8", "data.synthetic_image_size=20",
        "networks.a.arch_kwargs={patch_size: 4, img_size: 16, embed_dim: 64, depth: 1, num_heads: 1}",
        "networks.b.arch_kwargs={output_stride: 8, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}",
        "mokd.search_depth=1"]


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}
    done = subprocess.run([sys.executable, "-m", "mokd_scale.tools.bench.main", *args, "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


def test_step_bench_reports_throughput_flops_and_mfu_of_both_loops(tmp_path):
    report = run_bench(tmp_path, "step", "--steps", "1", "--warmup", "1", "--rounds", "1", "--threads", "1",
                       "--matmul-size", "256", "--matmul-seconds", "0.2", "--set", *TINY)
    assert report["world_size"] == 1 and report["zero_stage"] == {"a": 0, "b": 0}
    assert report["global_batch_size"] == 4 and report["dtype"] == "float32"
    assert report["flops"]["per_micro_batch"] == sum(report["flops"]["parts"].values()) > 0
    assert report["flops"]["per_image"] == pytest.approx(report["flops"]["per_micro_batch"] / 4)
    assert report["peak_matmul"]["flops_per_s_all_ranks"] > 0
    for loop in ("ours", "ddp"):
        result = report[loop]
        assert result["images_per_s"] > 0 and len(result["round_images_per_s"]) == 1
        assert result["model_flops_per_s"] == pytest.approx(result["images_per_s"] * report["flops"]["per_image"])
        assert 0 < result["mfu"] <= 1 and 0 < result["mfu_cpu_time"] <= 1
        assert result["images_per_cpu_s"] > 0
        assert result["peak_memory_gib"] > 0
    ratio = report["ours"]["images_per_s"] / report["ddp"]["images_per_s"]
    assert report["ratio_ours_over_ddp"] == pytest.approx(ratio)


def test_memory_bench_zero2_holds_half_the_optimizer_state_of_zero0_on_two_ranks(tmp_path):
    report = run_bench(tmp_path, "memory", "--stages", "0,2", "--nproc", "2", "--threads", "1", "--set", *TINY)
    stages = {s["stage"]: s for s in report["measured"]["stages"]}
    assert report["measured"]["world_size"] == 2 and len(stages[0]["ranks"]) == 2
    for rank in stages[0]["ranks"]:
        for net in rank["networks"].values():
            # ZeRO-0 fp32 AdamW: the master is the fp32 parameters; two fp32 moments (+ step scalars).
            assert net["master_bytes"] == 4 * net["trainable_params"]
            assert 8 * net["trainable_params"] <= net["moment_bytes"] < 8 * net["trainable_params"] + 4096
    for rank in stages[2]["ranks"]:
        for name, net in rank["networks"].items():
            assert net["zero_stage"] == 2
            assert net["master_bytes"] >= 2 * net["trainable_params"]  # half of 4 bytes/param, plus padding
    ratio = report["zero2_over_zero0"]
    held = {stage: stages[stage]["optimizer_state_bytes_max_rank"] for stage in (0, 2)}
    assert ratio == pytest.approx(held[2] / held[0])
    assert 0.45 < ratio <= 0.55
    projection = report["projection"]
    totals = [projection["stages"][str(s)]["total_gib"] for s in range(4)]
    assert totals == sorted(totals, reverse=True) and totals[3] > 0
    vit = projection["params"]["a"]
    assert vit["arch"] == "vit_large_patch16_224" and 3.0e8 < vit["total"] < 6.0e8
    vit_stage0 = projection["stages"]["0"]["networks"]["a"]
    assert vit_stage0["optimizer_fp32"] == pytest.approx(12 * vit["trainable"] / 2**30)
    assert projection["deepspeed_estimator"]["zero2_gpu_gib_no_offload"] > 0


def test_projection_formulas_shard_what_each_stage_shards():
    from mokd_scale.tools.bench.memory import projected_gib
    gib = 2**30
    psi = gib  # one Gi-parameter network makes the table read in bytes per parameter
    stage0, stage1, stage2, stage3 = (projected_gib(psi, psi, "adamw", s, 8) for s in range(4))
    assert (stage0["params_bf16"], stage0["grads_bf16"]) == (2, 2)
    assert (stage0["optimizer_fp32"], stage0["teacher_fp32"]) == (12, 4)
    assert (stage1["grads_bf16"], stage1["optimizer_fp32"]) == (2, 12 / 8)
    assert (stage2["params_bf16"], stage2["grads_bf16"]) == (2, 2 / 8)
    assert (stage3["params_bf16"], stage3["teacher_fp32"]) == (2 / 8, 4)
    assert projected_gib(psi, psi, "sgd", 0, 8)["optimizer_fp32"] == 8


def test_data_bench_writes_its_json_with_out_like_the_others(tmp_path):
    report = run_bench(tmp_path, "data", "--images", "4", "--seconds", "0.1", "--rounds", "1", "--locals", "2")
    assert report["images"] == 4 and report["local_crops"] == 2
    assert report["ours_images_per_s"] > 0 and report["reference_images_per_s"] > 0
    assert report["speedup"] == round(report["ours_images_per_s"] / report["reference_images_per_s"], 2)


def test_unknown_command_is_a_usage_error():
    done = subprocess.run([sys.executable, str(REPO / "tools/bench.py"), "speed"], capture_output=True, text=True)  # the wrapper
    assert done.returncode == 2 and "step, memory, data" in done.stderr
