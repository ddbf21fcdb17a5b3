"""mokd-bench gpu: what one GPU does with the flagship step, eager and compiled, at several micro-batches.

    mokd-bench gpu [--config vitl16_r152] [--micro-batches 32,64,128] [--variants eager,compile]
                   [--steps 5] [--warmup 2] [--budget 450] [--width recipe|tiny] [--set KEY=VALUE ...] [--out FILE]

For each micro-batch and variant (eager: train.compile=false; compile: train.compile=true) the
real step (OurStep: the recipe's Learners and Coordinator, ZeRO-2, bf16 on a GPU, the recipe's
activation checkpointing) runs on one rank: images/s per GPU over --steps timed steps after
--warmup steps, MFU (model FLOPs counted as `mokd-bench step` counts them, over the dense bf16
matmul rate measured in the same process), peak memory, the first step's seconds (a compiled
variant compiles then) and the host's lead (below).

Each variant runs in its own process (this command with --only VARIANT:MICRO_BATCH), one after
the other: an out-of-memory or a crash of one is reported as such and the others are kept. All of
them share --budget seconds, first compiles included; each gets what is left, and one that has
less than MIN_VARIANT_S left is reported as skipped. Order: the first micro-batch listed (the
recipe's) in every variant, then the others eager, then the others compiled: an eager variant takes
about a minute, a compiled one several (each micro-batch is a new set of static shapes to compile),
so the budget goes first to the comparison at the recipe's micro-batch, then to the eager curve.

The host's lead (`host_ahead_share`): the share of a step's wall time during which the GPU runs
kernels, from torch.profiler over one extra step. While the GPU has work queued the host is ahead
of it; the rest of the step the GPU waits for the host (a host-bound step has a small share).
Summing kernel times overstates it when kernels of several streams overlap. None on a CPU.

On a CPU (the test, or a look at the machinery): --width tiny keeps the recipe's depths and crops
at tiny widths (as `mokd-bench ops`); the MFU is then against the fp32 matmul rate.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from mokd_scale.config import load_config
from mokd_scale.runtime import dist
from mokd_scale.tools.bench.step import (OurStep, add_recipe_args, batches_for_step, bench_config,
                                         bench_micro_batches, device_name, launch, matmul_size, measured_matmul_rate,
                                         mokd_step_flops, peak_memory_bytes, recipe_overrides, reset_peak_memory,
                                         start_rank, synchronize, timed_round)

VARIANTS = ("eager", "compile")
MIN_VARIANT_S = 30.0  # less than this cannot even build the pair
ZERO_STAGE = 2  # the recipe's


# ---------------------------------------------------------------- one variant, in its own process

def variant_overrides(args, variant: str, micro_batch: int) -> list[str]:
    from mokd_scale.tools.bench.ops import tiny_width_overrides

    sets = [f"train.micro_batch_size={micro_batch}", f"train.compile={'true' if variant == 'compile' else 'false'}"]
    overrides = recipe_overrides(args.set, ZERO_STAGE, args.config)
    if args.width == "tiny":
        overrides += tiny_width_overrides(load_config(args.config, overrides))
    return overrides + sets


def variant_worker(args) -> dict:
    variant, micro_batch = args.only
    info = start_rank(args)
    overrides = variant_overrides(args, variant, micro_batch)
    config = bench_config(args.config, overrides, info.world_size, 1)
    device = info.device
    reset_peak_memory(device)
    loop = OurStep(config, info)
    pool = bench_micro_batches(config, info, min(args.warmup + args.steps, args.pool))
    start = time.perf_counter()
    loop.step(0, batches_for_step(pool, 0, 1))
    synchronize(device)
    first_step_s = time.perf_counter() - start
    for step in range(1, args.warmup):
        loop.step(step, batches_for_step(pool, step, 1))
    seconds, _ = timed_round(loop, pool, 1, args.warmup, args.steps, device)
    peak_memory = peak_memory_bytes(device)
    ahead = host_ahead_share(loop, pool, args.warmup + args.steps, device)
    dtype = loop.dtype()
    peak_rate = measured_matmul_rate(device, dtype, matmul_size(args, device), args.matmul_seconds)
    per_image = mokd_step_flops(config)["per_image"]
    images_per_s = micro_batch * args.steps / seconds
    result = {"variant": variant, "micro_batch_size": micro_batch, "status": "ok", "images_per_s": images_per_s,
              "seconds_per_step": seconds / args.steps, "mfu": per_image * images_per_s / peak_rate,
              "model_flops_per_image": per_image, "peak_matmul_flops_per_s": peak_rate,
              "peak_memory_gib": peak_memory / 2**30, "first_step_s": first_step_s, "host_ahead_share": ahead,
              "dtype": str(dtype).replace("torch.", ""), "zero_stage": loop.zero_stages(),
              "device": device_name(device), "overrides": overrides}
    dist.destroy()
    return result


def host_ahead_share(loop, pool: list[dict], step: int, device: torch.device) -> float | None:
    """Kernel time over wall time of one profiled step (module doc); None without CUDA."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loop.step(step, batches_for_step(pool, step, 1))
        synchronize(device)
    wall = time.perf_counter() - start
    busy = sum(event.self_device_time_total for event in prof.key_averages()) / 1e6
    return min(1.0, busy / wall)


# ---------------------------------------------------------------- all variants, one process each

def variant_command(argv: list[str], variant: str, micro_batch: int, out: str) -> list[str]:
    """This command again, for one variant, writing its JSON to `out`."""
    rest = strip_out(argv)
    return [sys.executable, "-m", "mokd_scale.tools.bench.main", "gpu", *rest, "--only", f"{variant}:{micro_batch}",
            "--out", out]


def strip_out(argv: list[str]) -> list[str]:
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--out":
            skip = True
        elif not arg.startswith("--out="):
            rest.append(arg)
    return rest


def run_variant_process(command: list[str], out: str, timeout: float) -> dict:
    """Run one variant's process; its JSON, or what went wrong (status oom / failed / timeout)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within the {timeout:.0f} s left of --budget"}
    if done.returncode == 0 and os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
        result.pop("mode", None)
        return result
    status = "oom" if "out of memory" in done.stderr.lower() else "failed"
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    return {"status": status, "error": " | ".join(tail) or f"exit code {done.returncode}"}


def run_order(variants: list[str], micro_batches: list[int]) -> list[tuple[str, int]]:
    """The first micro-batch in every variant, then each variant's other micro-batches (module doc)."""
    return [(v, micro_batches[0]) for v in variants] + [(v, mb) for v in variants for mb in micro_batches[1:]]


def run_all(args, argv: list[str], run_process=run_variant_process) -> dict:
    deadline = time.monotonic() + args.budget
    results = []
    with tempfile.TemporaryDirectory(prefix="mokd-bench-gpu-") as work:
        for variant, micro_batch in run_order(args.variants, args.micro_batches):
            left = deadline - time.monotonic()
            entry = {"variant": variant, "micro_batch_size": micro_batch}
            if left < MIN_VARIANT_S:
                entry.update(status="skipped", error=f"{left:.0f} s of --budget left")
            else:
                out = os.path.join(work, f"{variant}_{micro_batch}.json")
                entry.update(run_process(variant_command(argv, variant, micro_batch, out), out, left))
            results.append(entry)
            print(variant_line(entry), file=sys.stderr, flush=True)
    return {"mode": "gpu", "config": args.config, "width": args.width, "zero_stage": ZERO_STAGE,
            "steps": args.steps, "warmup": args.warmup, "budget_s": args.budget,
            "device": next((r["device"] for r in results if r["status"] == "ok"), None), "variants": results}


# ---------------------------------------------------------------- the table

HEADER = (f"{'micro-batch':>11} {'variant':>8} {'images/s':>9} {'s/step':>7} {'MFU':>7} {'peak GiB':>9} "
          f"{'host ahead':>10} {'1st step s':>10}  status")


def variant_line(entry: dict) -> str:
    if entry["status"] != "ok":
        return f"{entry['micro_batch_size']:>11} {entry['variant']:>8} {'':>56}  {entry['status']}: {entry['error']}"
    ahead = "-" if entry["host_ahead_share"] is None else f"{entry['host_ahead_share']:.0%}"
    return (f"{entry['micro_batch_size']:>11} {entry['variant']:>8} {entry['images_per_s']:>9.1f} "
            f"{entry['seconds_per_step']:>7.3f} {entry['mfu']:>7.1%} {entry['peak_memory_gib']:>9.2f} "
            f"{ahead:>10} {entry['first_step_s']:>10.1f}  ok")


def gpu_table(report: dict) -> str:
    if report.get("mode") == "gpu_variant":
        return variant_line(report)
    ok = [r for r in report["variants"] if r["status"] == "ok"]
    dtype = ok[0]["dtype"] if ok else "?"
    head = (f"MOKD step on one device: {report['config']} ({report['width']} width) on {report['device']}, "
            f"ZeRO-{report['zero_stage']}, {dtype}, {report['steps']} timed steps after {report['warmup']}; "
            f"MFU over the measured {dtype} matmul rate")
    return "\n".join([head, HEADER, *(variant_line(r) for r in report["variants"])])


# ---------------------------------------------------------------- arguments

def parse_gpu_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-bench gpu", description=__doc__.split("\n")[0])
    add_recipe_args(parser, default_config="vitl16_r152")
    parser.add_argument("--micro-batches", default="32,64,128",
                        help="per-GPU micro-batches, comma-separated; the first is compared first")
    parser.add_argument("--variants", default="eager,compile",
                        help="eager and/or compile (train.compile=true)")
    parser.add_argument("--width", choices=("tiny", "recipe"), default="recipe",
                        help="recipe (default) or tiny: the recipe's depths and crops at tiny widths (a CPU check)")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps before timing (the first one compiles)")
    parser.add_argument("--pool", type=int, default=4, help="distinct micro-batches built before timing")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all variants together")
    parser.add_argument("--matmul-size", type=int, default=0, help="peak-rate matmul size (0: 4096 GPU, 1024 CPU)")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="duration of the peak-rate loop")
    parser.add_argument("--only", default="", help=argparse.SUPPRESS)  # VARIANT:MICRO_BATCH, one variant's process
    args = parser.parse_args(argv)
    args.micro_batches = positive_ints(parser, "--micro-batches", args.micro_batches)
    args.variants = [v for v in args.variants.split(",") if v]
    if not args.variants or any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants must be among {', '.join(VARIANTS)}, got {args.variants}")
    if args.steps < 1 or args.warmup < 1 or args.pool < 1:
        parser.error("--steps, --warmup and --pool must be >= 1 (the first warm-up step compiles)")
    if args.only:
        variant, micro_batch = args.only.split(":")
        args.only = (variant, int(micro_batch))
    return args


def positive_ints(parser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        parser.error(f"{flag} takes whole numbers like 32,64, got {text!r}")
    if not values or min(values) < 1:
        parser.error(f"{flag} must list micro-batches >= 1, got {text!r}")
    return values


def run_gpu_bench(argv=None) -> dict:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = parse_gpu_args(argv)
    if args.only:
        return {"mode": "gpu_variant", **launch(variant_worker, args)}
    return run_all(args, argv)
