"""One MOKD network: its student inside a DeepSpeed engine, its fp32 EMA teacher, its centres.

The teacher lives outside the engine on purpose: DeepSpeed would cast it to bf16, and a
bf16 EMA loses the (1 - m)·Δ increment when m is close to 1 (docs/design.md, invariant 4).
"""
from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
from torch import nn

from mokd_scale.config import Config, NetworkConfig, deepspeed_json_path, gradient_accumulation_steps
from mokd_scale.engine.lars import LARS
from mokd_scale.engine.ema import TeacherEMA
from mokd_scale.engine.gradients import GradientGate
from mokd_scale.method.losses import Centers
from mokd_scale.models import MokdNetwork, build_network
from mokd_scale.models.compile import compile_regions

LAST_LAYER = "last_layer"
BACKBONE_AND_HEADS = "regular"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs with native bf16, fp32 elsewhere (a CPU bf16 matmul is ~40x slower)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


OWN, PARTNER = "own", "partner"


def parameter_groups(student: MokdNetwork, search_head_schedule: str = OWN) -> list[dict]:
    """Tagged groups: DeepSpeed drops empty groups, so groups are found by tag, never index.

    Each parameter gets: whose lr / weight-decay schedule it follows ("schedule": own, or the
    partner's for the search head when search_head_schedule is "partner"), whether it decays
    (own schedule: not biases or other 1-D tensors; partner schedule: everything, as the authors'
    code runs its CNN's search head), and whether it is a last layer ("kind")."""
    last_layer = set(student.last_layer_parameter_names())
    no_decay = set(student.no_weight_decay_parameter_names())
    groups: dict[tuple[str, str, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        schedule = PARTNER if search_head_schedule == PARTNER and name.startswith("search_head.") else OWN
        decays = schedule == PARTNER or name not in no_decay
        kind = LAST_LAYER if name in last_layer else BACKBONE_AND_HEADS
        groups.setdefault((schedule, kind, decays), []).append(param)
    return [{"params": params, "name": f"{schedule}_{kind}{'' if decays else '_no_decay'}", "kind": kind,
             "schedule": schedule, "apply_weight_decay": decays, "weight_decay": 0.0}
            for (schedule, kind, decays), params in sorted(groups.items())]


def build_optimizer(net: NetworkConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """torch's fused kernels (CUDA and CPU): one launch per group rather than one per tensor, and
    the step counters stay on the parameters' device (foreach reads each one on the host)."""
    fast = {"fused": True}
    if net.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), **fast)
    if net.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=net.momentum, **fast)
    return LARS(groups, lr=0.0, momentum=net.momentum)


def deepspeed_config(net: NetworkConfig, config: Config, world_size: int, dtype: torch.dtype,
                     load_universal: bool = False) -> dict:
    """The network's ds_configs JSON with batch sizes and precision filled in from the recipe."""
    ds = read_deepspeed_json(net)
    if net.optimizer == "lars" and ds.get("zero_optimization", {}).get("stage", 0) > 0:
        raise ValueError(f"{net.arch}: LARS needs whole per-layer tensors, but ZeRO stage > 0 hands the optimizer "
                         f"flat partitions; use optimizer sgd, or ds_configs/zero0_fp32_cpu.json-style stage 0")
    accumulation = gradient_accumulation_steps(config, world_size)
    ds["train_micro_batch_size_per_gpu"] = config.train.micro_batch_size
    ds["gradient_accumulation_steps"] = accumulation
    ds["train_batch_size"] = config.train.micro_batch_size * accumulation * world_size
    # GradientGate refuses a non-finite gradient on every rank alike, so ZeRO-1/2's own bf16 check
    # (several operators per gradient tensor: ~11 k per step for the flagship) is not needed.
    ds["bf16"] = {"check_grad_overflow": False, **ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    # The recipe owns clipping: per-tensor clipping happens in GradientGate, so DeepSpeed's global
    # clipping is off then; `global` mode hands the threshold to DeepSpeed.
    ds["gradient_clipping"] = net.clip_grad if net.clip_mode == "global" else 0.0
    zero = ds.setdefault("zero_optimization", {})
    if net.clip_mode == "per_tensor" and (zero.get("stage", 0) == 2 or (zero.get("stage", 0) == 1 and
                                                                         dtype != torch.bfloat16)):
        # The gate computes every norm it needs; DeepSpeed's own global norm (a per-tensor loop and a
        # collective) would be computed and never used. DeepSpeed allows this on its ZeRO-1/2 optimizer
        # only. A config that sets it keeps its value.
        zero.setdefault("compute_grad_norm", False)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def read_deepspeed_json(net: NetworkConfig) -> dict:
    path = deepspeed_json_path(net.deepspeed)
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def zero_stage_of(net: NetworkConfig) -> int:
    return int(read_deepspeed_json(net).get("zero_optimization", {}).get("stage", 0))


class Learner:
    """Network `name` ("a" or "b"): engine(student), fp32 teacher, centres, schedules applied per step."""

    def __init__(self, name: str, config: Config, search_dim: int, device: torch.device, world_size: int,
                 load_universal: bool = False, initial_weights: dict | None = None):
        self.name = name
        self.net_cfg: NetworkConfig = getattr(config.networks, name)
        self.dtype = resolve_precision(self.net_cfg.precision, device)
        self.device = device
        student = build_network(config, name, search_dim=search_dim)
        if initial_weights is not None:  # a resume that cannot load the engine's own shards
            student.load_state_dict(initial_weights)
        teacher = make_teacher(config, name, student, search_dim)
        if device.type == "cuda" and world_size > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        self.teacher = teacher.to(device)
        for network in (student, teacher):
            network.backbone.channels_last = wants_channels_last(network, device, self.dtype)
        if config.train.compile:
            compile_student_and_teacher(student, teacher, self.net_cfg)
        self.ds_config = deepspeed_config(self.net_cfg, config, world_size, self.dtype, load_universal)
        groups = parameter_groups(student, self.net_cfg.search_head_schedule)
        # Before DeepSpeed swaps each group's parameters for its flat fp32 partition, in the same dicts.
        group_params = [list(group["params"]) for group in groups]
        optimizer = build_optimizer(self.net_cfg, groups)
        self.engine, _, _, _ = deepspeed.initialize(model=student.to(device), optimizer=optimizer,
                                                    config=self.ds_config)
        if self.dtype == torch.bfloat16:
            match_buffers_to_parameters(self.engine.module)
        self.zero_stage = self.engine.zero_optimization_stage()
        self.gradients = GradientGate(optimizer, group_params, self.net_cfg.clip_grad,
                                      self.net_cfg.clip_mode == "per_tensor", LAST_LAYER, self.engine.optimizer)
        self.ema = TeacherEMA(self.teacher, self.engine.module, self.zero_stage)
        self.centers = Centers(config.mokd.out_dim, config.mokd.center_momentum,
                               with_search=config.mokd.mode == "mokd").to(device)

    @property
    def student(self) -> nn.Module:
        return self.engine.module

    # --- checkpoint parts (mokd_scale/checkpoint.py composes them) ---------------------------------
    def state_dict(self) -> dict:
        """What lives outside the engine: the fp32 teacher and the centres (world-size independent)."""
        return {"teacher": self.teacher.state_dict(), "centers": self.centers.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.teacher.load_state_dict(state["teacher"])
        self.centers.load_state_dict(state["centers"])

    def save_engine(self, tag_dir: Path) -> None:
        """Collective: the student and its optimizer state under tag_dir/<name>/ (DeepSpeed's layout)."""
        self.engine.save_checkpoint(str(tag_dir), tag=self.name, save_latest=False)

    def load_engine(self, tag_dir: Path, engine_tag: str | None = None) -> None:
        """engine_tag: the folder under tag_dir (default: this network's name; a universal copy has its own)."""
        path, _ = self.engine.load_checkpoint(str(tag_dir), tag=engine_tag or self.name,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise FileNotFoundError(f"checkpoint {tag_dir} has no engine state for network {self.name}")

    def apply_schedule(self, values: dict[str, float], partner: str, last_layer_frozen: bool) -> None:
        """Write this step's lr / wd into the engine's groups (ZeRO passes them through) and tell the
        gradient gate whether the last layer is frozen."""
        for group in self.engine.optimizer.param_groups:
            owner = partner if group.get("schedule") == PARTNER else self.name
            group["lr"] = values[f"lr.{owner}"]
            group["weight_decay"] = values[f"wd.{owner}"] if group.get("apply_weight_decay") else 0.0
        self.gradients.begin_step(freeze_last_layer=last_layer_frozen)

    def step(self) -> None:
        """engine.step() after a micro-batch's backward; at the accumulation boundary it updates.
        DeepSpeed may itself skip an update on an overflow (fp32 ZeRO): that counts as non-finite."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        if boundary and not self.gradients.ran:
            self.gradients.non_finite = True

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s over all student parameters, in fp32."""
        self.ema.update(momentum)


def make_teacher(config: Config, name: str, student: nn.Module, search_dim: int) -> nn.Module:
    """The student's weights at step 0 (DINO), fp32, never touched by an optimizer, and built
    without stochastic depth: a teacher's targets and centres must not be random."""
    with torch.device("meta"):  # no random init to throw away: the weights come from the student
        teacher = build_network(config, name, teacher=True, search_dim=search_dim)
    teacher = teacher.to_empty(device=next(student.parameters()).device)
    teacher.load_state_dict(student.state_dict())
    for buffer_name, buffer in student.named_buffers():  # non-persistent buffers are not in a state_dict
        teacher.get_buffer(buffer_name).copy_(buffer)
    teacher.float().requires_grad_(False)
    return teacher


def match_buffers_to_parameters(module: nn.Module) -> None:
    """DeepSpeed casts parameters, not buffers, to bf16. CPU BatchNorm rejects fp32 running stats with
    bf16 input; so does CUDA's BatchNorm when it is recomputed under gradient checkpointing in backward
    ("Expected running_mean to have type BFloat16 but got Float", ResNet-152 of vitl16_r152 on an H100)."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)


def compile_student_and_teacher(student: nn.Module, teacher: nn.Module, net: NetworkConfig) -> None:
    """train.compile: regional torch.compile, before DeepSpeed wraps the student (its engine then
    calls the compiled blocks)."""
    if zero_stage_of(net) == 3:
        raise ValueError(f"train.compile with ZeRO-3 ({net.deepspeed}): ZeRO-3 gathers each block's parameters in "
                         "hooks that a compiled block would have to trace; use a ZeRO-2 config or train.compile=false")
    for network in (student, teacher):
        compile_regions(network)


def wants_channels_last(network: MokdNetwork, device: torch.device, dtype: torch.dtype) -> bool:
    """CNNs in bf16 on a GPU: tensor-core convolutions want NHWC. A CPU or fp32 gains nothing."""
    return not network.backbone.is_vit and device.type == "cuda" and dtype == torch.bfloat16
