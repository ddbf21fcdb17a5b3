"""One MOKD network: its student inside a DeepSpeed engine, its fp32 EMA teacher, its centres.

The teacher lives outside the engine on purpose: DeepSpeed would cast it to bf16, and a
bf16 EMA loses the (1 - m)·Δ increment when m is close to 1 (DESIGN.md invariant 4).
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import deepspeed
import torch
from torch import nn

from mokd_scale.config import Config, NetworkConfig, gradient_accumulation_steps
from mokd_scale.lars import LARS
from mokd_scale.losses import Centers
from mokd_scale.models import MokdNetwork, build_network

LAST_LAYER = "last_layer"
BACKBONE_AND_HEADS = "regular"
REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs with native bf16, fp32 elsewhere (a CPU bf16 matmul is ~40x slower)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def parameter_groups(student: MokdNetwork) -> list[dict]:
    """Tagged groups: DeepSpeed drops empty groups, so groups are found by tag, never index."""
    last_layer = set(student.last_layer_parameter_names())
    no_decay = set(student.no_weight_decay_parameter_names())
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        key = (LAST_LAYER if name in last_layer else BACKBONE_AND_HEADS, name not in no_decay)
        groups.setdefault(key, []).append(param)
    return [{"params": params, "name": f"{kind}{'' if decays else '_no_decay'}", "kind": kind,
             "apply_weight_decay": decays, "weight_decay": 0.0}
            for (kind, decays), params in sorted(groups.items()) if params]


def build_optimizer(net: NetworkConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if net.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999))
    if net.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=net.momentum)
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
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": dtype == torch.bfloat16}
    ds.setdefault("gradient_clipping", 3.0)
    if load_universal:
        ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
    return ds


def read_deepspeed_json(net: NetworkConfig) -> dict:
    path = Path(net.deepspeed)
    if not path.is_absolute() and not path.exists():
        path = REPO_ROOT / path
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {net.deepspeed!r} not found (networks.X.deepspeed; see ds_configs/)")
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
        student = build_network(self.net_cfg, config.mokd, search_dim)
        if initial_weights is not None:  # a resume that cannot load the engine's own shards
            student.load_state_dict(initial_weights)
        if device.type == "cuda" and world_size > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        student.to(device)
        self.teacher = self.make_teacher(student)
        self.ds_config = deepspeed_config(self.net_cfg, config, world_size, self.dtype, load_universal)
        optimizer = build_optimizer(self.net_cfg, parameter_groups(student))
        self.engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer,
                                                    config=self.ds_config)
        if self.dtype == torch.bfloat16:
            match_buffers_to_parameters(self.engine.module)
        self.centers = Centers(config.mokd.out_dim, config.mokd.center_momentum).to(device)
        self.zero_stage = self.engine.zero_optimization_stage()

    @staticmethod
    def make_teacher(student: nn.Module) -> nn.Module:
        """Same weights as the student at step 0 (DINO), fp32, never touched by an optimizer."""
        teacher = copy.deepcopy(student).float()
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher

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

    def apply_schedule(self, lr: float, weight_decay: float, last_layer_frozen: bool) -> None:
        """Write this step's lr / wd into the engine's groups (ZeRO passes them through)."""
        for group in self.engine.optimizer.param_groups:
            frozen = last_layer_frozen and group.get("kind") == LAST_LAYER
            group["lr"] = 0.0 if frozen else lr
            group["weight_decay"] = weight_decay if group.get("apply_weight_decay") else 0.0

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s over all student parameters, in fp32."""
        teacher_params = dict(self.teacher.named_parameters())
        for child_name, child in self.student.named_children():
            named = list(child.named_parameters())
            # One gather per part (backbone, heads) rather than one collective per tensor.
            with gathered([param for _, param in named], self.zero_stage):
                targets = [teacher_params[f"{child_name}.{name}"] for name, _ in named]
                sources = [param.detach().float() for _, param in named]
                torch._foreach_mul_(targets, momentum)
                torch._foreach_add_(targets, sources, alpha=1.0 - momentum)

    def global_grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0


def match_buffers_to_parameters(module: nn.Module) -> None:
    """DeepSpeed casts parameters, not buffers, to bf16. CPU BatchNorm rejects fp32 running stats with
    bf16 input; so does CUDA's BatchNorm when it is recomputed under gradient checkpointing in backward
    ("Expected running_mean to have type BFloat16 but got Float", ResNet-152 of vitl16_r152 on an H100)."""
    for buffer in module.buffers():
        if buffer.is_floating_point():
            buffer.data = buffer.data.to(torch.bfloat16)


def gathered(params: list[nn.Parameter], zero_stage: int):
    """Under ZeRO-3 each rank holds a shard of a parameter: gather to read whole tensors."""
    if zero_stage == 3:
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()
