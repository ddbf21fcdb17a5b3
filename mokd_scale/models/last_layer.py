"""Weight-normalised last layer (no bias): weight = scale * direction / ||direction||.

Written as two plain parameters instead of torch's weight-norm parametrisation so that
DeepSpeed (ZeRO partitioning, bf16 casting) sees ordinary tensors, and so the optimizer can
put them in their own "last_layer" group (frozen during the first epoch).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LAST_LAYER_PARAMETERS = ("last_layer.direction", "last_layer.scale")


class WeightNormLinear(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, freeze_scale: bool = True):
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        # A frozen scale of 1 makes every prototype a unit vector: logits are cosine
        # similarities, which keeps the K-way softmax well conditioned early in training.
        self.scale = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Row norms near 0.58 (torch's Linear default): the direction's effective learning
        # rate is lr / ||direction||, so its initial length matters even though it is normalised.
        nn.init.kaiming_uniform_(self.direction, a=math.sqrt(5))
        nn.init.ones_(self.scale)

    def weight(self) -> torch.Tensor:
        norm = self.direction.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.scale * (self.direction / norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())
