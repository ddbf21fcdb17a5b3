"""mokd-bench memory: what each ZeRO stage holds per rank, measured (tiny recipe) and projected (flagship).

    mokd-bench memory [--stages 0,1,2,3] [--nproc 2] [--steps 1] [--out FILE]
                                 [--flagship vitl16_r152] [--gpus-per-node 8] [--nodes 4]

Measured: for each stage, both networks of the tiny recipe (AdamW on both, so the stages compare
like for like) are built as Learners on --nproc ranks and trained --steps steps (Adam states are
created lazily), then each rank walks its own optimizer objects. "Optimizer-state bytes" = the fp32
master copy + the Adam moments this rank holds: the tensors the base (torch) optimizer updates
(ZeRO-1/2/3: this rank's flat fp32 partitions; ZeRO-0: the fp32 model parameters themselves)
plus every tensor in its state (exp_avg, exp_avg_sq, step), each storage counted once. Peak memory:
CUDA max_memory_allocated, or on CPU the process's peak RSS (VmHWM, reset before each stage; it
includes the interpreter and libraries, hence also the delta over the RSS before the stage).

Projected: parameter counts of the flagship on the meta device (mokd_scale.models.summary) and the
ZeRO paper's model-state formulas per GPU, activations excluded: bf16 params 2Ψ, bf16 grads 2Ψ,
fp32 master + optimizer state 12Ψ for AdamW (8Ψ for SGD/LARS: master + momentum); ZeRO-1 shards
the optimizer term, ZeRO-2 also the grads, ZeRO-3 also the params, over all GPUs. Each network's
fp32 EMA teacher adds 4Ψ per GPU, not sharded. DeepSpeed's own estimators are printed alongside.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io

import torch

from mokd_scale.runtime import dist
from mokd_scale.config import load_config
from mokd_scale.tools.bench.step import (OurStep, add_recipe_args, all_ranks_max, batches_for_step, bench_config,
                        bench_micro_batches, device_name, launch, load_average, peak_memory_bytes,
                        recipe_overrides, reset_peak_memory, start_rank)

GIB = 2**30
OPTIMIZER_BYTES_PER_PARAM = {"adamw": 12, "sgd": 8, "lars": 8}  # fp32 master 4 + moments


# ---------------------------------------------------------------- measured

def unique_tensor_bytes(tensors, seen: set) -> int:
    """Bytes of tensors not counted before (by storage), so an alias is never counted twice."""
    total = 0
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.device)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(engine) -> dict[str, int]:
    """What this rank's optimizer holds: master weights it updates, and its state tensors."""
    zero = engine.optimizer
    base = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer
    # Master weights: what the base optimizer updates, plus ZeRO's own fp32 partitions (ZeRO-3 hands
    # them to the base optimizer only during step(); with fp32 params they alias the parameter shard).
    masters = [p for group in base.param_groups for p in group["params"]]
    masters += list(getattr(zero, "single_partition_of_fp32_groups", []) or [])
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", []) or [])
    seen: set = set()
    master = unique_tensor_bytes(masters, seen)
    moments = unique_tensor_bytes((v for state in base.state.values() for v in state.values()), seen)
    return {"master_bytes": master, "moment_bytes": moments, "optimizer_state_bytes": master + moments}


def module_parameter_bytes(module) -> int:
    """Parameter bytes this rank holds for the engine's module (ZeRO-3: its shards only)."""
    seen: set = set()
    total = 0
    for param in module.parameters():
        shard = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps the real data in ds_tensor
        total += unique_tensor_bytes([shard if shard is not None else param], seen)
    return total


def current_rss_bytes() -> int:
    import resource
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_stage(args, info, stage: int) -> dict:
    adamw = [f"networks.{name}.optimizer=adamw" for name in load_config(args.config, args.set).networks]
    overrides = recipe_overrides([*adamw, *args.set], stage, args.config)
    config = bench_config(args.config, overrides, info.world_size, 1)
    pool = bench_micro_batches(config, info, 1)
    gc.collect()
    rss_before = current_rss_bytes() if info.device.type == "cpu" else torch.cuda.memory_allocated(info.device)
    reset_peak_memory(info.device)
    ours = OurStep(config, info)
    for step in range(args.steps):
        ours.step(step, batches_for_step(pool, step, 1))
    peak = peak_memory_bytes(info.device)
    per_network = {}
    for name, learner in ours.learners.items():
        trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                        for p in learner.student.parameters() if p.requires_grad)
        per_network[name] = {**optimizer_state_bytes(learner.engine), "trainable_params": trainable,
                             "param_bytes": module_parameter_bytes(learner.student),
                             "zero_stage": learner.zero_stage}
    result = {"stage": stage, "networks": per_network,
              "optimizer_state_bytes": sum(n["optimizer_state_bytes"] for n in per_network.values()),
              "peak_bytes": peak, "peak_over_start_bytes": peak - rss_before}
    del ours, pool
    gc.collect()
    return result


def memory_worker(args) -> dict:
    info = start_rank(args)
    stages = []
    for stage in args.stages:
        mine = measure_stage(args, info, stage)
        # Rank 0 reports every rank's numbers: they differ when partitions are uneven.
        per_rank = gather_objects(mine)
        stages.append({"stage": stage, "ranks": per_rank,
                       "optimizer_state_bytes_max_rank": max(r["optimizer_state_bytes"] for r in per_rank),
                       "peak_gib_max_rank": max(r["peak_bytes"] for r in per_rank) / GIB})
        all_ranks_max(0.0, info.device)  # keep ranks in step between stages
    report = {"device": device_name(info.device), "world_size": info.world_size, "config": args.config,
              "steps": args.steps, "stages": stages}
    dist.destroy()
    return report


def gather_objects(value) -> list:
    if not dist.is_dist():
        return [value]
    out = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, value)
    return out


# ---------------------------------------------------------------- projected

def largest_layer_params(network) -> int:
    return max(sum(p.numel() for p in module.parameters(recurse=False)) for module in network.modules())


def flagship_counts(config_name: str) -> dict:
    from mokd_scale.models import build_network
    from mokd_scale.models.summary import parameter_counts

    config = load_config(config_name)
    counts = {}
    for name, net_cfg in config.networks.items():
        with torch.device("meta"):
            network = build_network(config, name)
        counts[name] = {"arch": net_cfg.arch, "optimizer": net_cfg.optimizer, **parameter_counts(network),
                        "largest_layer": largest_layer_params(network)}
    return counts


def projected_gib(psi_total: int, psi_trainable: int, optimizer: str, stage: int, gpus: int) -> dict:
    """Model-state GiB per GPU for one network at one ZeRO stage (see module doc)."""
    params = 2 * psi_total / (gpus if stage >= 3 else 1)
    grads = 2 * psi_trainable / (gpus if stage >= 2 else 1)
    optim = OPTIMIZER_BYTES_PER_PARAM[optimizer] * psi_trainable / (gpus if stage >= 1 else 1)
    teacher = 4 * psi_total
    return {"params_bf16": params / GIB, "grads_bf16": grads / GIB, "optimizer_fp32": optim / GIB,
            "teacher_fp32": teacher / GIB, "total": (params + grads + optim + teacher) / GIB}


def deepspeed_estimates(psi_total: int, largest: int, gpus_per_node: int, nodes: int) -> dict:
    """DeepSpeed's estimators for one network (no offload numbers, plus their printed tables)."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_cold)
    from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                      estimate_zero2_model_states_mem_needs_all_cold)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero2_model_states_mem_needs_all_cold(psi_total, gpus_per_node, nodes)
        estimate_zero3_model_states_mem_needs_all_cold(psi_total, largest, gpus_per_node, nodes)
    _, zero2_gpu = estimate_zero2_model_states_mem_needs(psi_total, gpus_per_node, nodes, cpu_offload=False)
    _, zero3_gpu, _ = estimate_zero3_model_states_mem_needs(psi_total, largest, gpus_per_node, nodes,
                                                            cpu_offload=False, cpu_offload_params=False)
    return {"zero2_gpu_gib_no_offload": zero2_gpu / GIB, "zero3_gpu_gib_no_offload": zero3_gpu / GIB,
            "printed": printed.getvalue()}


def flagship_projection(config_name: str, gpus_per_node: int, nodes: int) -> dict:
    gpus = gpus_per_node * nodes
    counts = flagship_counts(config_name)
    stages = {}
    for stage in range(4):
        per_network = {name: projected_gib(c["total"], c["trainable"], c["optimizer"], stage, gpus)
                       for name, c in counts.items()}
        stages[stage] = {"networks": per_network, "total_gib": sum(n["total"] for n in per_network.values())}
    vit = next((name for name, c in counts.items() if c["arch"].startswith("vit")), "a")
    estimator = deepspeed_estimates(counts[vit]["total"], counts[vit]["largest_layer"], gpus_per_node, nodes)
    return {"config": config_name, "gpus_per_node": gpus_per_node, "nodes": nodes, "params": counts,
            "stages": stages, "deepspeed_estimator": {"network": vit, **estimator}}


# ---------------------------------------------------------------- report

def memory_table(report: dict) -> str:
    measured = report["measured"]
    lines = [f"measured on {measured['device']}, {measured['world_size']} rank(s), {measured['config']} "
             f"(AdamW on both), after {measured['steps']} step(s); per rank (max over ranks):",
             f"{'ZeRO':<6}{'optimizer state MiB':>20}{'x ZeRO-0':>10}{'params MiB':>12}{'peak GiB':>10}"
             f"{'peak-start MiB':>16}"]
    base = next((s["optimizer_state_bytes_max_rank"] for s in measured["stages"] if s["stage"] == 0), None)
    for stage in measured["stages"]:
        ranks = stage["ranks"]
        ratio = f"{stage['optimizer_state_bytes_max_rank'] / base:.3f}" if base else "-"
        params = max(sum(n["param_bytes"] for n in r["networks"].values()) for r in ranks)
        lines.append(f"{stage['stage']:<6}{stage['optimizer_state_bytes_max_rank'] / 2**20:>20.3f}{ratio:>10}"
                     f"{params / 2**20:>12.3f}{stage['peak_gib_max_rank']:>10.3f}"
                     f"{max(r['peak_over_start_bytes'] for r in ranks) / 2**20:>16.1f}")
    if report.get("zero2_over_zero0") is not None:
        lines.append(f"ZeRO-2 / ZeRO-0 optimizer-state bytes per rank: {report['zero2_over_zero0']:.3f} "
                     f"(target <= 0.55)")
    projection = report.get("projection")
    if projection:
        lines += projection_lines(projection)
    lines.append(f"load average: {report['load_average']}")
    return "\n".join(lines)


def projection_lines(projection: dict) -> list[str]:
    gpus = projection["gpus_per_node"] * projection["nodes"]
    params = projection["params"]
    lines = ["", f"projection: {projection['config']} on {projection['nodes']} nodes x {projection['gpus_per_node']} "
             f"GPUs = {gpus}; model states per GPU in GiB, activations excluded"]
    for name, c in params.items():
        lines.append(f"  {name}: {c['arch']} ({c['optimizer']}) {c['total'] / 1e6:.1f} M params "
                     f"({c['trainable'] / 1e6:.1f} M trainable, largest layer {c['largest_layer'] / 1e6:.1f} M)")
    lines.append(f"{'ZeRO':<6}{'net':<5}{'params':>9}{'grads':>9}{'optim':>9}{'teacher':>9}{'total':>9}")
    for stage, row in projection["stages"].items():
        for name, gib in row["networks"].items():
            lines.append(f"{stage:<6}{name:<5}{gib['params_bf16']:>9.2f}{gib['grads_bf16']:>9.2f}"
                         f"{gib['optimizer_fp32']:>9.2f}{gib['teacher_fp32']:>9.2f}{gib['total']:>9.2f}")
        lines.append(f"{stage:<6}{'a+b':<5}{'':>36}{row['total_gib']:>9.2f}")
    estimator = projection["deepspeed_estimator"]
    lines += [f"DeepSpeed's estimator for network {estimator['network']} alone (no teacher; its ZeRO-2 counts "
              f"fp32 grads too): ZeRO-2 {estimator['zero2_gpu_gib_no_offload']:.2f} GiB/GPU, ZeRO-3 "
              f"{estimator['zero3_gpu_gib_no_offload']:.2f} GiB/GPU (no offload)", estimator["printed"].rstrip()]
    return lines


def parse_memory_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-bench memory", description=__doc__.split("\n")[0])
    add_recipe_args(parser)
    parser.set_defaults(nproc=2)
    parser.add_argument("--stages", default="0,1,2,3", help="comma-separated ZeRO stages to measure")
    parser.add_argument("--steps", type=int, default=1, help="training steps before measuring (>= 1)")
    parser.add_argument("--flagship", default="vitl16_r152", help="recipe to project ('' to skip)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        args.stages = [int(s) for s in args.stages.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--stages must be comma-separated integers 0..3, got {args.stages!r}")
    if not args.stages or any(s not in (0, 1, 2, 3) for s in args.stages) or args.steps < 1:
        parser.error("--stages takes stages from 0,1,2,3 and --steps must be >= 1")
    return args


def run_memory_bench(argv=None) -> dict:
    args = parse_memory_args(argv)
    loads = [load_average()]
    measured = launch(memory_worker, args)
    loads.append(load_average())
    stages = {s["stage"]: s["optimizer_state_bytes_max_rank"] for s in measured["stages"]}
    report = {"mode": "memory", "measured": measured,
              "zero2_over_zero0": stages[2] / stages[0] if 0 in stages and 2 in stages else None,
              "load_average": loads}
    if args.flagship:
        report["projection"] = flagship_projection(args.flagship, args.gpus_per_node, args.nodes)
    return report
