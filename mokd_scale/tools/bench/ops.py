"""mokd-bench ops: operators dispatched per optimizer step of the MOKD step, by phase and kind.

    mokd-bench ops [--config vitl16_r152] [--width tiny|recipe] [--zero 0,2] [--steps 1] [--warmup 1]
                   [--compiled no|yes|both] [--set KEY=VALUE ...] [--no-ddp] [--nproc 1] [--out FILE]

Host overhead on a GPU grows with the number of operators the step dispatches (each one costs
microseconds of Python, dispatcher and launch work whatever its size), and that number is the
same on a CPU: the step is run here, on the CPU, through the same Learners and Coordinator a
run uses (OurStep), and every operator that reaches torch's dispatcher is counted by a
TorchDispatchMode, over whole optimizer steps after --warmup steps (which create optimizer
state and let the first-call paths run).

Each operator is attributed to the innermost named phase running when it is dispatched
(mokd_scale.runtime.profiling: `with phase("ema")`, ...; "other" outside any). Autograd runs a CPU
backward in the calling thread, so backward operators are seen and fall in the phase that
called backward. Phases are reported in the order they first appear; none is assumed.

Kinds (a precise rule, so before/after counts compare):
  collectives   operators of the c10d / _c10d_functional / deepspeed namespaces (all-reduce,
                all-gather, broadcast, ...).
  views         operators that launch no kernel on a GPU: views and aliases (the schema returns
                an alias of an input: view, reshape's alias, t, transpose, slice, select, expand,
                split, unbind, detach, alias, ...), in-place metadata changes (tag inplace_view:
                unsqueeze_, as_strided_, set_, resize_), allocations without initialisation
                (empty, empty_strided, empty_like, new_empty, new_empty_strided, _unsafe_view)
                and the profiler's record_function markers.
  launching     everything else: kernels, copies and transfers (copy_, _to_copy, the
                _local_scalar_dense behind .item()), fills (zero_, fill_).
  host_syncs    the launching operators whose result the host must wait for (.item(), nonzero,
                masked_select, equal: tags data_dependent_output and dynamic_output_shape); a
                subset of launching, listed because on a GPU each one stalls the host until the
                GPU catches up. Counted on the CPU, it includes reads of tensors that a GPU run
                keeps on the host anyway (torch optimizers' step counters): an upper bound.
A multi-tensor operator (torch._foreach_*) counts once: it is one dispatch (on CUDA it
launches one kernel per chunk of its tensor lists).

With `--compiled yes` (train.compile=true; `both`: eager and compiled side by side) the regions
run compiled (inductor's C++ kernels on the CPU, fused much as Triton kernels are on a GPU):
each call of a kernel inductor generated counts as one launching operator named
`inductor::cpp_fused_<the aten operators it fuses>`, and the library kernels a region calls
(matmuls, convolutions) are counted as in eager, as their operators
(mokd_scale/tools/bench/compiled.py: the rule, and why views inside a region are not counted).
The counter is an "infra" dispatch mode: under any other, dynamo would run the regions eagerly.
The first (--warmup) step compiles: minutes on a few cores.

What a count on the CPU does not show of a GPU run: device-specific choices (torch's own
defaults pick foreach only for CUDA tensors; the learner's optimizers are fused on both), bf16
autocast casts (the teachers run under autocast on CUDA only), and inductor's CUDA-specific
choices (it may fuse or split a little differently for Triton). DeepSpeed's gradient buckets hold
5e7 elements, so the flagship's full widths add a few operators per extra bucket.

Defaults: the flagship recipe at tiny width (--width tiny: the same depths, blocks, heads,
crops and crop sizes; ViT width 8 per attention head, ResNet channels 8/16, K = 256,
micro-batch 2): the number of operators does not depend on widths or batch. fp32 on the CPU;
`--set networks.a.precision=bf16 networks.b.precision=bf16` counts the bf16 engines' paths.
The DDP reference loop of `mokd-bench step` (both students in torch DDP, one backward of the
sum; the project's losses, clipping, optimizers and EMA) is counted the same way for comparison.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mokd_scale.runtime import dist
from mokd_scale.config import load_config
from mokd_scale.runtime.profiling import current_phase
from mokd_scale.tools.bench.compiled import GeneratedKernel, kernels_reported, listen
from mokd_scale.tools.bench.step import (ZERO_CONFIGS, DdpStep, OurStep, add_recipe_args, batches_for_step,
                                         bench_config, bench_micro_batches, device_name, launch, recipe_overrides,
                                         start_rank)

KINDS = ("launching", "views", "collectives")
COLLECTIVE_NAMESPACES = frozenset({"c10d", "_c10d_functional", "c10d_functional", "deepspeed"})
NO_KERNEL_OPS = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                           "aten::new_empty_strided", "aten::_unsafe_view"})
HOST_SYNC_TAGS = (torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape)
HOST_SYNC_OPS = frozenset({"aten::is_nonzero", "aten::_local_scalar_dense"})


def op_name(func) -> str:
    if isinstance(func, GeneratedKernel):
        return f"inductor::{func.name}"
    return f"{func._schema.name}.{func._overloadname}"


def kind_of(func) -> str:
    """"collectives", "views" or "launching" (module doc)."""
    if isinstance(func, GeneratedKernel):
        return "launching"
    if func.namespace in COLLECTIVE_NAMESPACES:
        return "collectives"
    if (func.namespace == "profiler" or func.is_view or torch.Tag.inplace_view in func.tags
            or func._schema.name in NO_KERNEL_OPS):
        return "views"
    return "launching"


def is_host_sync(func) -> bool:
    if isinstance(func, GeneratedKernel):
        return False
    return func._schema.name in HOST_SYNC_OPS or any(tag in func.tags for tag in HOST_SYNC_TAGS)


class OperatorCounter(TorchDispatchMode):
    """Counts every operator dispatched while active, by (phase, operator), and every call of a
    kernel generated for a compiled region (mokd_scale/tools/bench/compiled.py)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.listening = contextlib.nullcontext()

    @classmethod
    def is_infra_mode(cls) -> bool:
        return True  # dynamo runs compiled regions eagerly under any other dispatch mode

    def __enter__(self):
        self.listening = listen(self.record)
        self.listening.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self.listening.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.record(func)
        return func(*args, **(kwargs or {}))

    def record(self, func) -> None:
        self.counts[(current_phase(), func)] += 1

    def summary(self, steps: int = 1, top: int = 8) -> dict:
        """Per step, for each phase (in order of first appearance) and in total: operators of each
        kind, host syncs, the `top` most frequent launching operators and every operator's count."""
        by_phase: dict[str, collections.Counter] = {}
        for (phase_name, func), count in self.counts.items():
            by_phase.setdefault(phase_name, collections.Counter())[func] += count
        every = sum(by_phase.values(), collections.Counter())
        total = tally(every, steps, top)
        return {"per_step": {key: total[key] for key in (*KINDS, "host_syncs")},
                "phases": {name: tally(ops, steps, top) for name, ops in by_phase.items()},
                "kinds": {op_name(func): kind_of(func) for func in every}}


def tally(ops: collections.Counter, steps: int, top: int) -> dict:
    entry = {kind: per_step(sum(n for func, n in ops.items() if kind_of(func) == kind), steps) for kind in KINDS}
    entry["host_syncs"] = per_step(sum(n for func, n in ops.items() if is_host_sync(func)), steps)
    ranked = ops.most_common()
    launching = [(func, n) for func, n in ranked if kind_of(func) == "launching"][:top]
    entry["top_launching"] = {op_name(func): per_step(n, steps) for func, n in launching}
    entry["ops"] = {op_name(func): per_step(n, steps) for func, n in ranked}
    return entry


def per_step(count: int, steps: int) -> float | int:
    return count // steps if count % steps == 0 else round(count / steps, 2)


# ---------------------------------------------------------------- the sub-command

TINY_HEAD_DIM = 8  # ViT width = 8 x its heads; search-head width per head
TINY_RESNET = ["channels=[8, 8, 16, 16]", "stem_width=8"]
TINY_HEADS = ["mokd.out_dim=256", "mokd.proj_hidden_dim=64", "mokd.proj_bottleneck_dim=32",
              f"mokd.search_head_dim={TINY_HEAD_DIM}", "train.micro_batch_size=2"]


def tiny_width_overrides(config) -> list[str]:
    """The recipe's depths, blocks and crops at tiny widths (operator counts do not depend on width)."""
    from timm.models import model_entrypoint

    from mokd_scale.models.backbone import create_timm_model, is_vit_arch

    sets = list(TINY_HEADS)
    for name, net in config.networks.items():
        if is_vit_arch(net.arch):
            with torch.device("meta"):
                heads = create_timm_model(net.arch, net.arch_kwargs, 0.0).blocks[0].attn.num_heads
            sets.append(f"networks.{name}.arch_kwargs.embed_dim={TINY_HEAD_DIM * heads}")
        elif model_entrypoint(net.arch).__module__ == "timm.models.resnet":
            sets += [f"networks.{name}.arch_kwargs.{kwarg}" for kwarg in TINY_RESNET]
        else:
            raise SystemExit(f"--width tiny knows ViTs and timm ResNets, not {net.arch} (networks.{name}.arch): "
                             "use --width recipe, with --set for the widths")
    if config.mokd.search_dim > 0:  # a pair of CNNs names its search width
        sets.append(f"mokd.search_dim={TINY_HEAD_DIM * 8}")
    return sets


def ops_config(args, info, zero: int, compiled: bool = False):
    overrides = recipe_overrides([], zero, args.config)
    if args.width == "tiny":
        overrides += tiny_width_overrides(load_config(args.config, overrides + args.set))
    overrides += args.set + (["train.compile=true"] if compiled else [])
    return bench_config(args.config, overrides, info.world_size, args.accumulation), overrides


def count_loop(loop, pool: list[dict], args) -> dict:
    """Operators of --steps optimizer steps after --warmup steps, per step; and the warm-up's
    seconds (with train.compile, mostly compiling; inductor's on-disk cache shortens a rerun)."""
    start = time.perf_counter()
    for step in range(args.warmup):
        loop.step(step, batches_for_step(pool, step, args.accumulation))
    warmup_s = time.perf_counter() - start
    counter = OperatorCounter()
    with counter:
        for step in range(args.warmup, args.warmup + args.steps):
            loop.step(step, batches_for_step(pool, step, args.accumulation))
    return {**counter.summary(args.steps), "warmup_s": round(warmup_s, 1)}


def ops_worker(args) -> dict:
    with kernels_reported():  # before anything compiles: train.compile's kernels are then counted too
        return count_loops(args)


def count_loops(args) -> dict:
    info = start_rank(args)
    loops, report = {}, {}
    for zero in args.zero:
        for compiled in args.compiled:
            config, overrides = ops_config(args, info, zero, compiled)
            pool = bench_micro_batches(config, info, args.accumulation * (args.warmup + args.steps))
            ours = OurStep(config, info)
            loops[f"ours_zero{zero}" + ("_compiled" if config.train.compile else "")] = count_loop(ours, pool, args)
            if not report:
                report = describe(args, info, config, overrides, ours)
            del ours
    if not args.no_ddp:  # ZeRO does not concern it: the last stage's recipe and crops will do
        loops["ddp"] = count_loop(DdpStep(config, info), pool, args)
    report["loops"] = loops
    report["device"] = device_name(info.device)
    dist.destroy()
    return report


def describe(args, info, config, overrides: list[str], ours) -> dict:
    data = config.data
    return {
        "mode": "ops", "config": args.config, "width": args.width, "overrides": overrides,
        "world_size": info.world_size, "counted_rank": info.rank, "dtype": str(ours.dtype()).replace("torch.", ""),
        "micro_batch_size": config.train.micro_batch_size, "accumulation": args.accumulation,
        "crops": {"global": 2, "local": data.num_local_crops, "global_size": data.global_crop_size,
                  "local_size": data.local_crop_size},
        "parameter_tensors": {name: sum(1 for _ in learner.student.parameters())
                              for name, learner in ours.learners.items()},
        "warmup_steps": args.warmup, "counted_steps": args.steps,
        "method": "TorchDispatchMode over whole optimizer steps; kinds and phases as in "
                  "mokd_scale/tools/bench/ops.py's docstring",
    }


def ops_table(report: dict, top: int = 3) -> str:
    loops = report["loops"]
    phases = list(dict.fromkeys(p for loop in loops.values() for p in loop["phases"]))
    head = (f"Operators per optimizer step: {report['config']} ({report['width']} width), {report['dtype']}, "
            f"{report['crops']['global']} global + {report['crops']['local']} local crops, micro-batch "
            f"{report['micro_batch_size']}, rank {report['counted_rank']} of {report['world_size']}; "
            f"parameter tensors {report['parameter_tensors']}")
    widths = 24
    lines = [head, f"{'':<22}" + "".join(f"{name:>{widths}}" for name in loops),
             f"{'phase':<22}" + "".join(f"{'launch / views / coll':>{widths}}" for _ in loops)]

    def cells(entry) -> str:
        return "".join(f"{fmt(e['launching']) + ' / ' + fmt(e['views']) + ' / ' + fmt(e['collectives']):>{widths}}"
                       if e else f"{'-':>{widths}}" for e in entry)

    for phase_name in phases:
        lines.append(f"{phase_name:<22}" + cells([loop["phases"].get(phase_name) for loop in loops.values()]))
    lines.append(f"{'total':<22}" + cells([loop["per_step"] for loop in loops.values()]))
    lines.append(f"{'warm-up seconds':<22}" + "".join(f"{loop.get('warmup_s', '-'):>{widths}}"
                                                       for loop in loops.values()))
    lines.append(f"{'host syncs (GPU)':<22}" + "".join(f"{fmt(loop['per_step']['host_syncs']):>{widths}}"
                                                         for loop in loops.values()))
    lines.append(f"most frequent launching operators per phase (top {top}):")
    for name, loop in loops.items():
        for phase_name, entry in loop["phases"].items():
            ops = ", ".join(f"{op.replace('aten::', '')} {fmt(n)}" for op, n in list(entry["top_launching"].items())[:top])
            lines.append(f"  {name:<20} {phase_name:<22} {ops}")
    return "\n".join(lines)


def fmt(value) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def parse_ops_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-bench ops", description=__doc__.split("\n")[0])
    add_recipe_args(parser, default_config="vitl16_r152")
    parser.add_argument("--width", choices=("tiny", "recipe"), default="tiny",
                        help="tiny: the recipe's depths and crops at tiny widths, micro-batch 2 (default); "
                             "recipe: as the recipe says")
    parser.add_argument("--zero", default="0,2", help="ZeRO stages to count, comma-separated (0 -> "
                        "ds_configs/zero0_fp32_cpu.json, N -> ds_configs/zeroN_bf16.json; precision: the recipe's, "
                        "whose auto is fp32 on a CPU)")
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps counted")
    parser.add_argument("--warmup", type=int, default=1, help="steps run before counting")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per optimizer step")
    parser.add_argument("--no-ddp", action="store_true", help="count ours only")
    parser.add_argument("--compiled", choices=("no", "yes", "both"), default="no",
                        help="count ours with train.compile=true too (both: eager and compiled side by side; the "
                             "first compiled step compiles, for minutes on a few cores)")
    args = parser.parse_args(argv)
    try:
        args.zero = [int(stage) for stage in args.zero.split(",")]
    except ValueError:
        parser.error(f"--zero takes stages like 0,2, got {args.zero!r}")
    if not args.zero or any(stage not in ZERO_CONFIGS for stage in args.zero):
        parser.error(f"--zero stages must be among {sorted(ZERO_CONFIGS)}, got {args.zero}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    args.compiled = {"no": [False], "yes": [True], "both": [False, True]}[args.compiled]
    return args


def run_ops_bench(argv=None) -> dict:
    return launch(ops_worker, parse_ops_args(argv))
