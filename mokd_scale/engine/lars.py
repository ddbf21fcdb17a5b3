"""LARS (layer-wise adaptive rate scaling) for large-batch SGD on CNNs.

Biases and norm parameters (groups without weight decay) get plain SGD with momentum,
as is usual for self-supervised ResNet training; other tensors scale the update by
trust_coefficient · ‖w‖ / ‖g + wd·w‖.

Not timm.optim.Lars: timm divides by ‖g‖ + wd·‖w‖ (the LARS paper's bound, never smaller than
‖g + wd·w‖), so its steps are shorter whenever g and w are not aligned, and it decides adaptation
by the group's current weight decay rather than by the group's kind. The rule here is the one the
MOKD/DINO/BYOL line of work trains ResNets with.
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            adapt = group.get("apply_weight_decay", True)
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad.add(param, alpha=group["weight_decay"])
                if adapt:
                    update = update.mul(trust_ratio(param, update, group["trust_coefficient"]))
                buffer = self.state[param].setdefault("momentum_buffer", torch.zeros_like(param))
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss


def trust_ratio(param: torch.Tensor, update: torch.Tensor, coefficient: float) -> torch.Tensor:
    param_norm, update_norm = param.norm(), update.norm()
    ratio = coefficient * param_norm / update_norm
    return torch.where((param_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))
