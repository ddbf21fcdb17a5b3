"""mokd-bench step: images/s, model FLOP/s and MFU of the real MOKD step, against a plain DDP loop.

    mokd-bench step [--config tiny_cpu] [--set KEY=VALUE ...] [--zero 0|1|2|3]
                               [--nproc 2] [--steps 10] [--warmup 2] [--rounds 2] [--out FILE]

"ours" is train.step.Step over the recipe's Learners (DeepSpeed engines, fp32 EMA teachers), exactly
what mokd-train runs. "ddp" is the authors' way of running the same math: the students wrapped in
torch DDP, all forwards, one backward of the summed losses, torch optimizers. It is assembled from the
same pieces as a Learner (build_student_and_teacher, parameter groups, optimizer, apply_schedule,
GradientGate, TeacherEMA, Centers) and the same Objective, so only the engine and the order differ
(tests/test_bench_loops.py checks they give the same losses and weights), and both get the same crops
(pre-built synthetic micro-batches, so the data pipeline is not timed; see `mokd-bench data` for that).

Model FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one
micro-batch on the meta device (no memory, exact shapes): both teachers' forwards on the global
crops, each student's forward + backward on all crops, and the cross-search targets. Recomputation
from gradient checkpointing is NOT counted (model FLOPs, not hardware FLOPs), and only matmul-like
ops (mm, conv, attention) are counted. MFU = model FLOP/s over the dense-matmul rate measured in the
same run, same dtype, on every rank at once (bf16 4096^3 on CUDA, fp32 1024^3 on CPU).

On a CPU shared with other work, wall-clock images/s swing with the load: each loop is timed in
alternating rounds (best round reported), and images per CPU-second of the rank processes is
reported beside it (with an MFU per CPU-second), which measures the work per image whatever the
load. Compare ours and ddp on that ratio on a busy machine, on images/s on an idle one or a GPU.

Defaults chosen for a benchmark, not for training: data.source=synthetic, data.workers=0, and
train.global_batch_size = micro_batch_size x world size x --accumulation (1: no accumulation), so
`--config vitl16_r152` runs one micro-batch per step on a single GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import queue
import resource
import time
import traceback

import torch
from torch import nn

from mokd_scale.runtime import dist
from mokd_scale.config import Config, add_set_argument, load_config, validate_world_size
from mokd_scale.runtime.profiling import phase

ZERO_CONFIGS = {0: "ds_configs/zero0_fp32_cpu.json", 1: "ds_configs/zero1_bf16.json",
                2: "ds_configs/zero2_bf16.json", 3: "ds_configs/zero3_bf16.json"}
BENCH_DEFAULTS = ["data.source=synthetic", "data.workers=0"]


# ---------------------------------------------------------------- shared by step and memory

def add_recipe_args(parser: argparse.ArgumentParser, default_config: str = "tiny_cpu") -> None:
    parser.add_argument("--config", default=default_config, help="recipe name (mokd_scale/config/recipes/) or YAML path")
    add_set_argument(parser, "recipe fields (after the bench defaults data.source=synthetic, data.workers=0 "
                             "and after --zero)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="ranks to spawn on this machine (gloo on CPU, nccl on GPUs); ignored under "
                             "torchrun/srun, where every launched process is a rank")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per rank on CPU (0: cores / nproc, at least 1)")
    parser.add_argument("--out", default="", help="write the JSON result here instead of stdout")


def recipe_overrides(config_sets: list[str], zero: int | None, config_name: str = "tiny_cpu") -> list[str]:
    overrides = list(BENCH_DEFAULTS)
    if zero is not None:
        names = list(load_config(config_name, list(BENCH_DEFAULTS) + list(config_sets)).networks)
        overrides += [f"networks.{name}.deepspeed={ZERO_CONFIGS[zero]}" for name in names]
    return overrides + list(config_sets)


def bench_config(name: str, overrides: list[str], world_size: int, accumulation: int) -> Config:
    """The recipe with the global batch tied to micro x ranks x accumulation (see module doc)."""
    config = load_config(name, overrides)
    if accumulation < 1:
        raise SystemExit(f"--accumulation must be >= 1, got {accumulation}")
    train = dataclasses.replace(config.train, global_batch_size=config.train.micro_batch_size * world_size
                                * accumulation)
    config = dataclasses.replace(config, train=train)
    validate_world_size(config, world_size)
    return config


def threads_per_rank(requested: int, nproc: int) -> int:
    return requested if requested > 0 else max(1, (os.cpu_count() or 1) // max(1, nproc))


def launch(worker, args: argparse.Namespace):
    """Run worker(args) on every rank and return rank 0's result.

    Under torchrun/srun this process is already one rank. Otherwise --nproc 1 runs here, and
    --nproc N spawns N processes on a free localhost port (a failing rank's traceback is raised)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ or "SLURM_STEP_NUM_TASKS" in os.environ:
        return worker(args)
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc == 1:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(dist.free_port())})
        return worker(args)
    return spawn_ranks(worker, args, args.nproc)


def spawn_ranks(worker, args, nproc: int, timeout: float = 3600.0):
    import torch.multiprocessing as mp
    context = mp.get_context("spawn")
    results = context.Queue()
    port = dist.free_port()
    processes = [context.Process(target=rank_entry, args=(worker, args, rank, nproc, port, results))
                 for rank in range(nproc)]
    for process in processes:
        process.start()
    outcome: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    failed = True
    try:
        while len(outcome) < nproc:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if r not in outcome and p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    raise RuntimeError(f"rank(s) {dead or 'all'} died or timed out without a result")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outcome[rank] = value
        failed = False
    finally:
        for process in processes:  # a failed rank leaves the others blocked in a collective
            process.join(0 if failed else 30)
            if process.is_alive():
                process.kill()
                process.join(5)
    return outcome[0]


def rank_entry(worker, args, rank: int, world_size: int, port: int, results) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    try:
        results.put((rank, True, worker(args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))


def start_rank(args) -> dist.DistInfo:
    info = dist.init_distributed()
    if info.device.type == "cpu":
        threads = threads_per_rank(args.threads, info.world_size)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated by torch since the last reset. CPU: the process's peak RSS (VmHWM)
    since the last reset, which includes the interpreter and libraries."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # never reset: lifetime peak


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def all_ranks_max(value: float, device: torch.device) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return float(dist.all_reduce_max(tensor).item())


def all_ranks_sum(value: float, device: torch.device) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    return float(dist.all_reduce_sum(tensor).item())


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores visible)"


# ---------------------------------------------------------------- inputs

def bench_micro_batches(config: Config, info: dist.DistInfo, count: int) -> list[dict]:
    """`count` distinct micro-batches of this rank, built before timing and reused cyclically."""
    from mokd_scale.data import build_train_loader
    loader = iter(build_train_loader(config, info.rank, info.world_size))
    return [next(loader) for _ in range(count)]


def batches_for_step(pool: list[dict], step: int, per_step: int) -> list[dict]:
    return [pool[(step * per_step + i) % len(pool)] for i in range(per_step)]


# ---------------------------------------------------------------- peak matmul rate

def measured_matmul_rate(device: torch.device, dtype: torch.dtype, size: int, seconds: float,
                         per_cpu_second: bool = False) -> float:
    """Dense matmul FLOP/s of this rank, run on all ranks at once (they share the machine);
    per_cpu_second: FLOP per CPU-second of this process instead (CPU only; robust to other load)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    synchronize(device)
    dist.barrier()
    iterations, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while True:
        for _ in range(4 if device.type == "cpu" else 20):
            torch.mm(a, b)
            iterations += 1
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    if per_cpu_second:
        elapsed = time.process_time() - cpu_start
    return 2.0 * size ** 3 * iterations / elapsed


# ---------------------------------------------------------------- model FLOPs

def mokd_step_flops(config: Config) -> dict:
    """FLOPs of one micro-batch of the MOKD step, counted on the meta device (see module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mokd_scale.method.centers import Centers
    from mokd_scale.method.forward import student_forward, teacher_forward
    from mokd_scale.method.objective import Objective, uses_search_heads
    from mokd_scale.method.terms import Side
    from mokd_scale.models import build_network

    data, batch = config.data, config.train.micro_batch_size
    objective = Objective(config)
    with torch.device("meta"):
        # Built as teachers: no checkpointing (recomputation is hardware work, not model work).
        networks = {name: build_network(config, name, teacher=True).requires_grad_(True) for name in config.networks}
        centers = {name: Centers(config.mokd.out_dim, config.mokd.center_momentum,
                                 with_search=uses_search_heads(config)) for name in config.networks}
        crops = [torch.empty(batch, 3, data.global_crop_size, data.global_crop_size) for _ in range(2)]
        crops += [torch.empty(batch, 3, data.local_crop_size, data.local_crop_size)
                  for _ in range(data.num_local_crops)]
    counter = FlopCounterMode(display=False)
    with counter:
        sides = {name: Side(teacher_forward(net, crops[:2]), net, centers[name]) for name, net in networks.items()}
    flops = {"teachers_forward": counter.get_total_flops()}
    for name, network in networks.items():
        counter = FlopCounterMode(display=False)
        with counter:
            objective(name, student_forward(network, crops), sides, 0.04).total.backward()
        flops[f"student_{name}_fwd_bwd_and_cross_targets"] = counter.get_total_flops()
    total = sum(flops.values())
    return {"method": "FlopCounterMode on the meta device, one micro-batch: teachers' forwards + each student's "
                      "forward+backward + cross-search targets; matmul/conv/attention only; no recompute",
            "per_micro_batch": total, "per_image": total / batch, "parts": flops}


# ---------------------------------------------------------------- the two loops

class OurStep:
    """The real thing: train.step.Step over the recipe's Learners, as mokd-train builds them."""

    name = "ours"

    def __init__(self, config: Config, info: dist.DistInfo):
        from mokd_scale.method.objective import Objective
        from mokd_scale.train.loop import build_learners
        from mokd_scale.train.schedules import Schedules
        from mokd_scale.train.step import Step

        self.learners = build_learners(config, info)
        self.train_step = Step(self.learners, Objective(config), Schedules.build(config), config)

    def dtype(self) -> torch.dtype:
        return next(iter(self.learners.values())).dtype

    def zero_stages(self) -> dict[str, int]:
        return {name: learner.zero_stage for name, learner in self.learners.items()}

    def step(self, step: int, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns each network's loss terms and total, as DdpStep.step."""
        return self.train_step(step, micro_batches).terms


class MultiCropStudent(nn.Module):
    """One forward call over all crops, the role of DINO's MultiCropWrapper: DDP sees one forward
    and one backward per iteration, as in the authors' code."""

    def __init__(self, network: nn.Module, compute_dtype: torch.dtype):
        super().__init__()
        self.network = network
        self.compute_dtype = compute_dtype

    def forward(self, crops):
        from mokd_scale.method.forward import student_forward
        return student_forward(self.network, crops, self.compute_dtype)


class DdpNetwork:
    """One network of the DDP loop: a Learner's pieces around a torch DDP student instead of an engine."""

    def __init__(self, name: str, config: Config, search_dim: int, info: dist.DistInfo):
        from mokd_scale.config import search_head_schedule_owner
        from mokd_scale.engine.deepspeed_config import resolve_precision
        from mokd_scale.engine.ema import TeacherEMA
        from mokd_scale.engine.gradients import GradientGate
        from mokd_scale.engine.learner import build_student_and_teacher
        from mokd_scale.engine.optim import LAST_LAYER, build_optimizer, parameter_groups
        from mokd_scale.method.centers import Centers
        from mokd_scale.method.objective import uses_search_heads

        self.name, self.net_cfg = name, config.networks[name]
        self.dtype = resolve_precision(self.net_cfg.precision, info.device)
        self.search_head_owner = search_head_schedule_owner(config, name)
        network, self.teacher = build_student_and_teacher(config, name, search_dim, info.device, info.world_size,
                                                          self.dtype)
        network.to(info.device)
        groups = parameter_groups(network, self.net_cfg.search_head_schedule)
        self.optimizer = build_optimizer(self.net_cfg, groups)
        self.gradients = GradientGate(self.optimizer, [list(g["params"]) for g in groups], self.net_cfg.clip_grad,
                                      self.net_cfg.clip_mode == "per_tensor", LAST_LAYER)
        self.ema = TeacherEMA(self.teacher, network, zero_stage=0)
        device_ids = [info.device] if info.device.type == "cuda" else None
        self.student = nn.parallel.DistributedDataParallel(MultiCropStudent(network, self.dtype), device_ids=device_ids)
        self.centers = Centers(config.mokd.out_dim, config.mokd.center_momentum,
                               with_search=uses_search_heads(config)).to(info.device)


class DdpStep:
    """The authors' engine and ordering around the project's pieces: torch DDP students, every teacher's and
    every student's forward, then one backward of the summed losses, torch optimizers (module doc)."""

    name = "ddp"

    def __init__(self, config: Config, info: dist.DistInfo):
        from mokd_scale.method.objective import Objective
        from mokd_scale.models import pair_search_dim
        from mokd_scale.train.schedules import Schedules

        torch.manual_seed(config.seed)  # as build_learners: the same initial weights as ours
        search_dim = pair_search_dim(config)
        self.config, self.device = config, info.device
        self.schedules, self.objective = Schedules.build(config), Objective(config)
        self.networks = {name: DdpNetwork(name, config, search_dim, info) for name in config.networks}

    def dtype(self) -> torch.dtype:
        return next(iter(self.networks.values())).dtype

    def step(self, step: int, micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        """One optimizer step; returns each network's loss terms and total (term order), summed over
        micro-batches, on the device like Step's StepRecord.terms."""
        from mokd_scale.engine.optim import apply_schedule

        values = self.schedules.at(step)
        for name, net in self.networks.items():
            apply_schedule(net.optimizer.param_groups, values, name, net.search_head_owner)
            net.gradients.begin_step(freeze_last_layer=values.last_layer_frozen)
            net.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            with contextlib.ExitStack() as stack:
                if index < len(micro_batches) - 1:  # gradient accumulation: all-reduce only on the last micro-batch
                    for net in self.networks.values():
                        stack.enter_context(net.student.no_sync())
                for name, terms in self.micro_step(batch, values, len(micro_batches)).items():
                    sums[name] = terms if name not in sums else sums[name] + terms
        for name, net in self.networks.items():
            if net.net_cfg.clip_mode == "global" and net.net_cfg.clip_grad > 0:  # as the engine does
                with phase("grad_clip"):
                    torch.nn.utils.clip_grad_norm_(net.student.parameters(), net.net_cfg.clip_grad)
            with phase("optimizer"):
                net.optimizer.step()  # the gate's pre-hook clips per tensor and refuses non-finite gradients
            if net.gradients.non_finite:
                raise FloatingPointError(f"non-finite gradient in network {name} at step {step}")
        for net in self.networks.values():
            with phase("centers"):
                net.centers.update()
            with phase("ema"):
                net.ema.update(values.teacher_momentum)
        return sums

    def micro_step(self, batch: dict, values, accumulation: int) -> dict[str, torch.Tensor]:
        from mokd_scale.data import normalize_crops
        from mokd_scale.method.forward import teacher_forward
        from mokd_scale.method.terms import Side

        crops = normalize_crops(batch["crops"], self.device, torch.float32, self.config.data.mean,
                                self.config.data.std)
        sides = {}
        for name, net in self.networks.items():
            net.teacher.train()  # batch statistics in BatchNorm, like the student sees (as Learner)
            with phase("teacher_forward"):
                sides[name] = Side(teacher_forward(net.teacher, crops[:2], compute_dtype=net.dtype), net.teacher,
                                   net.centers)
        with phase("student_forward"):
            outputs = {name: net.student(crops) for name, net in self.networks.items()}
        terms = {name: self.objective(name, outputs[name], sides, values.networks[name].teacher_temperature,
                                      net.dtype) for name, net in self.networks.items()}
        loss = sum(t.total for t in terms.values()) / accumulation
        with phase("finite_check"):
            if not math.isfinite(loss.item()):  # the authors' per-rank check
                raise FloatingPointError(f"non-finite loss {loss.item()}")
        with phase("student_backward"):
            loss.backward()
        with phase("centers"):
            for name, side in sides.items():
                side.centers.accumulate(side.targets.proj, side.targets.search)
        return {name: torch.stack([t.values[term].detach().float() for term in self.objective.term_names]
                                  + [t.total.detach().float()]) for name, t in terms.items()}


# ---------------------------------------------------------------- timing

def timed_round(loop, pool: list[dict], per_step: int, first_step: int, steps: int, device) -> tuple[float, float]:
    """(wall seconds of the slowest rank, CPU seconds summed over ranks) for `steps` optimizer steps.

    CPU seconds (all threads of each rank process) measure the work done even when other
    processes share the cores; wall seconds are what training would see on an idle machine."""
    synchronize(device)
    dist.barrier()
    start, cpu_start = time.perf_counter(), time.process_time()
    for offset in range(steps):
        loop.step(first_step + offset, batches_for_step(pool, first_step + offset, per_step))
    synchronize(device)
    cpu = time.process_time() - cpu_start
    return all_ranks_max(time.perf_counter() - start, device), all_ranks_sum(cpu, device)


def profile_table(loop, pool, per_step: int, first_step: int, steps: int, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for offset in range(steps):
            loop.step(first_step + offset, batches_for_step(pool, first_step + offset, per_step))
        synchronize(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    if torch.cuda.is_available():  # where the GPU time goes, and how much of the wall it covers
        busy = sum(event.self_device_time_total for event in averages) / 1e6
        table += (f"\nGPU busy (sum of kernel time) {busy:.3f} s of {wall:.3f} s wall over {steps} steps (profiled)\n"
                  + averages.table(sort_by="self_device_time_total", row_limit=rows))
    return table


class PeakRate:
    """The dense-matmul rate, measured before and after every round on all ranks at once; the
    best measurement is the one least disturbed by other processes on the machine."""

    def __init__(self, args, info: dist.DistInfo, dtype: torch.dtype):
        self.args, self.info, self.dtype = args, info, dtype
        self.size = matmul_size(args, info.device)
        self.wall: list[float] = []  # FLOP/s summed over ranks
        self.per_cpu_s: list[float] = []  # FLOP per CPU-second, mean over ranks (CPU only)

    def measure(self) -> None:
        device, seconds = self.info.device, self.args.matmul_seconds
        self.wall.append(all_ranks_sum(measured_matmul_rate(device, self.dtype, self.size, seconds), device))
        if device.type == "cpu":
            rate = measured_matmul_rate(device, self.dtype, self.size, seconds / 2, per_cpu_second=True)
            self.per_cpu_s.append(all_ranks_sum(rate, device) / self.info.world_size)


class StepBench:
    """Alternating timed rounds of our step and the DDP loop on this rank."""

    def __init__(self, args, info: dist.DistInfo):
        self.args, self.info = args, info
        self.overrides = recipe_overrides(args.set, args.zero, args.config)
        self.config = bench_config(args.config, self.overrides, info.world_size, args.accumulation)
        self.per_step = args.accumulation
        self.pool = bench_micro_batches(self.config, info, min(self.per_step * (args.warmup + args.steps), args.pool))
        self.images_per_step = self.config.train.global_batch_size
        self.loads = [load_average()]
        self.flops = mokd_step_flops(self.config)
        self.loops = {"ours": OurStep(self.config, info)}
        self.peak = PeakRate(args, info, self.loops["ours"].dtype())
        self.results: dict[str, dict] = {}
        self.next_step: dict[str, int] = {}

    def run(self) -> None:
        self.peak.measure()
        for _ in range(self.args.rounds):  # ours, ddp, ours, ddp, ...: load spikes hit both alike
            self.time_round("ours")
            if not self.args.no_ddp:
                if "ddp" not in self.loops:  # built after ours' first round: its memory is not in ours' peak
                    self.loops["ddp"] = DdpStep(self.config, self.info)
                self.time_round("ddp")
            self.loads.append(load_average())

    def time_round(self, name: str) -> None:
        loop, device, steps = self.loops[name], self.info.device, self.args.steps
        if name not in self.results:  # first round of this loop: warm up, and measure its peak memory
            reset_peak_memory(device)
            for step in range(self.args.warmup):
                loop.step(step, batches_for_step(self.pool, step, self.per_step))
            self.next_step[name] = self.args.warmup
            self.results[name] = {"round_images_per_s": [], "round_images_per_cpu_s": []}
        seconds, cpu_seconds = timed_round(loop, self.pool, self.per_step, self.next_step[name], steps, device)
        self.next_step[name] += steps
        result = self.results[name]
        result["round_images_per_s"].append(self.images_per_step * steps / seconds)
        result["round_images_per_cpu_s"].append(self.images_per_step * steps / cpu_seconds)
        if "peak_memory_gib" not in result:
            result["peak_memory_gib"] = all_ranks_max(peak_memory_bytes(device), device) / 2**30
        self.peak.measure()

    def profiles(self) -> dict[str, str]:
        tables = {}
        for name, loop in self.loops.items():
            table = profile_table(loop, self.pool, self.per_step, self.next_step[name], self.args.profile_steps)
            if self.info.is_main:
                tables[name] = table
        return tables

    def summarize(self) -> None:
        per_image, peak = self.flops["per_image"], max(self.peak.wall)
        for result in self.results.values():
            best = max(result["round_images_per_s"])  # the round least disturbed by other processes
            result.update({"images_per_s": best, "seconds_per_step": self.images_per_step / best,
                           "images_per_cpu_s": max(result["round_images_per_cpu_s"]),
                           "model_flops_per_s": per_image * best, "mfu": per_image * best / peak})
            if self.peak.per_cpu_s:  # model work per CPU-second over matmul work per CPU-second
                result["mfu_cpu_time"] = per_image * result["images_per_cpu_s"] / max(self.peak.per_cpu_s)

    def report(self) -> dict:
        config, results, ours = self.config, self.results, self.loops["ours"]
        dtype = str(ours.dtype()).replace("torch.", "")
        both = "ddp" in results
        return {
            "mode": "step", "config": self.args.config, "overrides": self.overrides,
            "device": device_name(self.info.device), "world_size": self.info.world_size,
            "threads_per_rank": torch.get_num_threads() if self.info.device.type == "cpu" else None,
            "zero_stage": ours.zero_stages(), "dtype": dtype,
            "micro_batch_size": config.train.micro_batch_size, "accumulation": self.per_step,
            "global_batch_size": self.images_per_step,
            "crops": {"global": 2, "local": config.data.num_local_crops,
                      "global_size": config.data.global_crop_size, "local_size": config.data.local_crop_size},
            "warmup_steps": self.args.warmup, "timed_steps_per_round": self.args.steps, "rounds": self.args.rounds,
            "ours": results["ours"], "ddp": results.get("ddp"),
            "ratio_ours_over_ddp": results["ours"]["images_per_s"] / results["ddp"]["images_per_s"] if both else None,
            "ratio_ours_over_ddp_per_cpu_s": (results["ours"]["images_per_cpu_s"] / results["ddp"]["images_per_cpu_s"]
                                              if both else None),
            "flops": self.flops,
            "peak_matmul": {"dtype": dtype, "size": self.peak.size, "flops_per_s_all_ranks": max(self.peak.wall),
                            "ranks_measured_together": self.info.world_size, "measurements": self.peak.wall,
                            "flops_per_cpu_s": max(self.peak.per_cpu_s) if self.peak.per_cpu_s else None},
            "load_average": self.loads,
        }


def step_worker(args) -> dict:
    bench = StepBench(args, start_rank(args))
    bench.run()
    profiles = bench.profiles() if args.profile_steps > 0 else {}
    bench.summarize()
    report = bench.report()
    if profiles:
        report["profiles"] = profiles
    dist.destroy()
    return report


def matmul_size(args, device: torch.device) -> int:
    if args.matmul_size > 0:
        return args.matmul_size
    return 4096 if device.type == "cuda" else 1024


def step_table(report: dict) -> str:
    lines = [f"MOKD step benchmark: {report['config']} on {report['device']}, {report['world_size']} rank(s), "
             f"ZeRO {report['zero_stage']}, {report['dtype']}, global batch {report['global_batch_size']} "
             f"(micro {report['micro_batch_size']} x accumulation {report['accumulation']})",
             f"model FLOPs per image {report['flops']['per_image'] / 1e9:.3f} GFLOP (counted); measured "
             f"{report['peak_matmul']['dtype']} matmul peak {report['peak_matmul']['flops_per_s_all_ranks'] / 1e9:.1f} "
             f"GFLOP/s (all ranks)",
             f"{'loop':<6}{'images/s':>12}{'s/step':>10}{'GFLOP/s':>12}{'MFU':>9}{'peak mem GiB':>14}"
             f"{'img/CPU-s':>11}   images/s per round"]
    for name in ("ours", "ddp"):
        result = report.get(name)
        if not result:
            continue
        rounds = " ".join(f"{x:.1f}" for x in result["round_images_per_s"])
        lines.append(f"{name:<6}{result['images_per_s']:>12.2f}{result['seconds_per_step']:>10.3f}"
                     f"{result['model_flops_per_s'] / 1e9:>12.2f}{result['mfu']:>9.2%}"
                     f"{result['peak_memory_gib']:>14.2f}{result['images_per_cpu_s']:>11.2f}   {rounds}")
    if report["ratio_ours_over_ddp"] is not None:
        lines.append(f"ours / ddp: {report['ratio_ours_over_ddp']:.3f}x images/s (wall), "
                     f"{report['ratio_ours_over_ddp_per_cpu_s']:.3f}x images per CPU-second")
    if report["ours"].get("mfu_cpu_time") is not None:
        lines.append("MFU per CPU-second (robust to other load): " + ", ".join(
            f"{name} {report[name]['mfu_cpu_time']:.2%}" for name in ("ours", "ddp") if report.get(name)))
    lines.append(f"load average (1, 5, 15 min) before / after rounds: {report['load_average']}")
    for name, table in report.get("profiles", {}).items():
        lines += [f"--- profile of {name} (rank 0, self CPU time) ---", table]
    return "\n".join(lines)


def parse_step_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mokd-bench step", description=__doc__.split("\n")[0])
    add_recipe_args(parser)
    parser.add_argument("--zero", type=int, choices=sorted(ZERO_CONFIGS), default=None,
                        help="ZeRO stage for both networks: 0 -> ds_configs/zero0_fp32_cpu.json, "
                             "N -> ds_configs/zeroN_bf16.json (default: the recipe's)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each loop's first round")
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating timed rounds of ours and ddp; the best round of each is reported")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per rank per optimizer step")
    parser.add_argument("--pool", type=int, default=4, help="distinct micro-batches built before timing")
    parser.add_argument("--no-ddp", action="store_true", help="time ours only (e.g. when memory is tight)")
    parser.add_argument("--matmul-size", type=int, default=0, help="peak-rate matmul size (0: 4096 GPU, 1024 CPU)")
    parser.add_argument("--matmul-seconds", type=float, default=1.0, help="duration of the peak-rate loop")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after timing, profile this many steps of each loop and print the top ops")
    args = parser.parse_args(argv)
    for name in ("steps", "rounds", "pool"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def run_step_bench(argv=None) -> dict:
    args = parse_step_args(argv)
    return launch(step_worker, args)
