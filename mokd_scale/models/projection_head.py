"""Projection head ("MLP head"): 3-layer MLP to a bottleneck, L2-normalise, K prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mokd_scale.models.last_layer import WeightNormLinear


def init_linear(module: nn.Module) -> None:
    """Small truncated-normal weights and zero biases for every Linear below `module`."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.trunc_normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class ProjectionHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int,
                 use_bn: bool = False, freeze_scale: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            *hidden_layer(in_dim, hidden_dim, use_bn),
            *hidden_layer(hidden_dim, hidden_dim, use_bn),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        init_linear(self.mlp)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_scale)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(pooled), dim=-1)
        return self.last_layer(bottleneck)


def hidden_layer(in_dim: int, out_dim: int, use_bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    if use_bn:
        layers.append(nn.BatchNorm1d(out_dim))
    layers.append(nn.GELU())
    return layers
