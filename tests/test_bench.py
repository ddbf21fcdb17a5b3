"""mokd-bench step / memory / data / science end to end on tiny settings: the JSON has the documented fields and
values that can only come out of a working measurement. No timing assertions (shared CPUs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent

TINY = ["train.micro_batch_size=4", "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
        "data.global_crop_size=16", "data.local_crop_size=8", "data.synthetic_image_size=20",
        "networks.a.arch_kwargs={patch_size: 4, img_size: 16, embed_dim: 64, depth: 1, num_heads: 1}",
        "networks.b.arch_kwargs={output_stride: 8, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}",
        "mokd.search_depth=1"]


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache/torch_extensions"))}
    return subprocess.run([sys.executable, "-m", "mokd_scale.tools.bench.main", *args, "--out",
                           str(tmp_path / "bench.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def run_bench(tmp_path: Path, *args: str) -> dict:
    done = bench(tmp_path, *args)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((tmp_path / "bench.json").read_text())


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
    assert done.returncode == 2 and "step, memory, ops, gpu, data, science" in done.stderr


SCIENCE_TINY = ["train.global_batch_size=8", "train.micro_batch_size=8", "data.workers=0", "mokd.out_dim=64",
                "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16", "mokd.search_depth=1", "eval.batch_size=64",
                "networks.a.arch_kwargs={patch_size: 4, img_size: 32, embed_dim: 64, depth: 1, num_heads: 1}",
                "networks.b.arch_kwargs={output_stride: 16, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}",
                "train.term_gradients_every=1"]


def test_science_bench_trains_both_modes_reports_the_gain_and_reuses_finished_runs(tmp_path):
    from tests.test_demo_data import fake_fashion_mnist
    fake_fashion_mnist(tmp_path / "src", n_train=60, n_val=40)
    work = tmp_path / "work"
    args = ["science", "--work", str(work), "--source", str(tmp_path / "src"), "--train-per-class", "6",
            "--val-per-class", "4", "--seeds", "1", "--nproc", "1", "--knn-every", "2"]
    done = bench(tmp_path, *args, "--steps", "2", "--set", *SCIENCE_TINY)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    for line in ("run 1/2 mokd seed 0: step 2/2", "run 2/2 independent seed 0: k-NN at step 2: a: top-1"):
        assert line in done.stderr
    assert (report["steps"], report["seeds"], report["data"]["train_images"]) == (2, [0], 60)
    runs = {run["mode"]: run for run in report["runs"]}
    assert sorted(runs) == ["independent", "mokd"]
    logged = {}
    for mode, run in runs.items():
        assert not run["reused"] and run["train_seconds"] > 0
        rows = [json.loads(line) for line in (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        logged[mode] = set().union(*rows)
        for name in ("a", "b"):
            assert run["knn_curve"][name] == [[0, run["random_init_top1"][name]], [2, run["final_top1"][name]]]
            assert 0 <= run["final_top1"][name] <= run["final_top5"][name] <= 100
    # Both modes trained as they should: MOKD logs all four terms, independent only self-distillation.
    assert {"a.self_proj", "a.self_search", "a.cross_proj", "a.cross_search", "b.cross_search"} <= logged["mokd"]
    assert "a.self_proj" in logged["independent"] and not {"a.self_search", "b.cross_proj"} & logged["independent"]
    # Where each term pushes the backbones: logged every step here, summarised as shares per mode.
    assert {"a.grad.self_search", "b.grad.cross_search", "b.grad.clipped_fraction"} <= logged["mokd"]
    assert "a.grad.self_proj" in logged["independent"] and "a.grad.self_search" not in logged["independent"]
    shares = report["gradient_shares"]["a"]
    assert shares["mokd"]["steps"] == [1, 2] and shares["independent"]["mean_share"] == {"self_proj": 1.0}
    assert sum(shares["mokd"]["mean_share"].values()) == pytest.approx(1.0)
    assert "gradient at a's backbone, mokd, mean over the run: self_proj" in done.stderr
    for name in ("a", "b"):
        summary, top1 = report["summary"][name], {mode: runs[mode]["final_top1"][name] for mode in runs}
        assert summary["mokd"]["mean"] == top1["mokd"] and summary["independent"]["values"] == [top1["independent"]]
        assert summary["gain"]["mean"] == pytest.approx(top1["mokd"] - top1["independent"])
        assert summary["gain"]["paired_differences"] == [pytest.approx(summary["gain"]["mean"])]
    assert Path(report["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second call reuses the finished runs; other settings for the same folders are refused.
    metrics_before = (work / "runs/mokd-seed0/metrics.jsonl").read_text()
    again = run_bench(tmp_path, *args, "--steps", "2", "--set", *SCIENCE_TINY)
    assert all(run["reused"] for run in again["runs"]) and again["summary"] == report["summary"]
    assert (work / "runs/mokd-seed0/metrics.jsonl").read_text() == metrics_before
    clash = bench(tmp_path, *args, "--steps", "3", "--set", *SCIENCE_TINY)
    assert clash.returncode == 2 and "other settings (train.steps: run has 2, now 3" in clash.stderr
    assert "Traceback" not in clash.stderr



def test_science_summary_gain_is_the_difference_of_means_with_its_standard_error():
    from mokd_scale.tools.bench.science_report import summarize
    top1 = {("mokd", 0): 60.0, ("mokd", 1): 62.0, ("mokd", 2): 64.0,
            ("independent", 0): 55.0, ("independent", 1): 56.0, ("independent", 2): 57.0}
    records = [{"mode": mode, "seed": seed, "final_top1": {"a": value, "b": 70.0 - (mode == "mokd")},
                "random_init_top1": {"a": 50.0, "b": 60.0}} for (mode, seed), value in top1.items()]
    summary = summarize(records)
    a, b = summary["a"], summary["b"]
    assert (a["mokd"]["mean"], a["mokd"]["std"], a["independent"]["std"]) == (62.0, 2.0, 1.0)
    assert a["gain"]["mean"] == 6.0 and a["gain"]["se"] == pytest.approx((4 / 3 + 1 / 3) ** 0.5)
    assert a["gain"]["paired_differences"] == [5.0, 6.0, 7.0] and a["gain"]["verdict"] == "MOKD better"
    assert a["random_init"]["mean"] == 50.0 and a["random_init"]["n"] == 6
    # Every seed 1 point lower: no spread, so the standard error is 0 and the verdict "worse".
    assert b["gain"]["mean"] == -1.0 and b["gain"]["se"] == 0.0 and b["gain"]["verdict"] == "MOKD worse"
