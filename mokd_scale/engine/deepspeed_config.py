"""A network's DeepSpeed configuration: its ds_configs JSON with the recipe's batch sizes, precision and
clipping filled in, and the precision rule."""
from __future__ import annotations

import json

import torch

from mokd_scale.config import Config, NetworkConfig, deepspeed_json_path, gradient_accumulation_steps


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs with native bf16, fp32 elsewhere (a CPU bf16 matmul is ~40x slower)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def deepspeed_config(net: NetworkConfig, config: Config, world_size: int, dtype: torch.dtype) -> dict:
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
    return ds


def read_deepspeed_json(net: NetworkConfig) -> dict:
    path = deepspeed_json_path(net.deepspeed)
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def zero_stage_of(net: NetworkConfig) -> int:
    return int(read_deepspeed_json(net).get("zero_optimization", {}).get("stage", 0))
