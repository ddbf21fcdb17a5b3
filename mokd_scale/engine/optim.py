"""A network's optimizer: tagged parameter groups, the optimizer, and the per-step lr / weight decay.

Groups are tagged, never found by index: DeepSpeed drops empty groups. The tags (`name`, `kind`,
`schedule`, `apply_weight_decay`) are stored in every optimizer checkpoint, so they keep their values.
"""
from __future__ import annotations

import torch
from torch import nn

from mokd_scale.config import NetworkConfig
from mokd_scale.engine.lars import LARS

LAST_LAYER = "last_layer"
BACKBONE_AND_HEADS = "regular"
OWN, PARTNER = "own", "partner"  # whose schedule a group follows: its network's, or the search head's owner's


def parameter_groups(student: nn.Module, search_head_schedule: str = OWN) -> list[dict]:
    """Each parameter gets: whose lr / weight-decay schedule it follows ("schedule": own, or "partner" for
    the search head when search_head_schedule is not "own": the network the config names, see
    config.search_head_schedule_owner), whether it decays (own schedule: not biases or other 1-D tensors;
    the other schedule: everything, as the authors' code runs its CNN's search head), and whether it is a
    last layer ("kind")."""
    last_layer = set(student.last_layer_parameter_names())
    no_decay = set(student.no_weight_decay_parameter_names())
    groups: dict[tuple[str, str, bool], list[nn.Parameter]] = {}
    for name, param in student.named_parameters():
        if not param.requires_grad:
            continue
        schedule = PARTNER if search_head_schedule != OWN and name.startswith("search_head.") else OWN
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


def apply_schedule(param_groups: list[dict], values, name: str, search_head_owner: str) -> None:
    """Write one step's lr / weight decay (train.schedules.StepValues) into the groups of network `name`
    (DeepSpeed's optimizers pass param_groups through to the torch optimizer)."""
    for group in param_groups:
        owner = values.networks[search_head_owner if group.get("schedule") == PARTNER else name]
        group["lr"] = owner.lr
        group["weight_decay"] = owner.weight_decay if group.get("apply_weight_decay") else 0.0
