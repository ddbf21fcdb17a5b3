"""Search head ("T-head", cross-attention feature search).

Backbone tokens are projected to the pair's shared width D, given a learned 2-D position
embedding (resized to the crop's grid) and, optionally, a query token in front: the partner
network's detached summary of a local crop. Pre-norm transformer blocks let the patch tokens
attend to the query, the query is dropped, the patch tokens are averaged, and a
weight-normalised linear layer gives K logits.

The pooled feature is L2-normalised before that layer, as in the projection head: the
logits are then (scaled) cosine similarities, bounded like the projection head's, so both
heads' softmaxes at the same temperatures are equally sharp. (The design names no
normalisation here; without it the logits grow with sqrt(D) and the targets start one-hot.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from mokd_scale.models.backbone import BackboneOutput
from mokd_scale.models.last_layer import WeightNormLinear
from mokd_scale.models.projection_head import init_linear

# The position embedding is stored on a 14x14 grid (224 px / 16) and resized per crop.
BASE_GRID = (14, 14)


class SearchHead(nn.Module):
    def __init__(self, token_dim: int, dim: int, depth: int, head_dim: int, out_dim: int,
                 summary_is_pooled: bool, freeze_scale: bool = True, base_grid=BASE_GRID):
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(f"search width {dim} (mokd.search_dim or the ViT's width) is not a multiple of "
                             f"mokd.search_head_dim={head_dim}")
        # A 1x1 convolution over the feature map is a Linear over tokens; a ViT already of
        # width D needs no projection.
        self.channel_proj = nn.Identity() if token_dim == dim else nn.Linear(token_dim, dim)
        self.position = nn.Parameter(torch.zeros(1, dim, *base_grid))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads=dim // head_dim, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        # A pre-norm stack leaves its residual stream unnormalised; close it with a norm, as a
        # ViT does, so the pooled feature has a stable scale before the K-way layer.
        self.norm = nn.LayerNorm(dim)
        self.last_layer = WeightNormLinear(dim, out_dim, freeze_scale)
        self.summary_is_pooled = summary_is_pooled
        init_linear(self.blocks)
        init_linear(self.channel_proj)
        nn.init.trunc_normal_(self.position, std=0.02)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.channel_proj(tokens)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, h*w, D), bicubic-resized from the base grid."""
        position = self.position
        if tuple(grid) != tuple(position.shape[-2:]):
            # bicubic upsampling is not implemented for bf16 on every backend: resize in fp32.
            position = F.interpolate(position.float(), size=tuple(grid), mode="bicubic",
                                     align_corners=False).to(self.position.dtype)
        return position.flatten(2).transpose(1, 2)

    def summary(self, features: BackboneOutput, projected: torch.Tensor) -> torch.Tensor:
        """The D-wide query this network sends to its partner (always detached).
        ViT: its class token; CNN: mean of its projected tokens."""
        if self.summary_is_pooled:
            return self.channel_proj(features.pooled).detach()
        return projected.mean(dim=1).detach()

    def forward(self, tokens: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: (B, N, D) already projected and position-embedded; query: (B, D) or None."""
        if query is not None:
            if query.shape != (tokens.shape[0], tokens.shape[2]):
                raise ValueError(f"query of shape {tuple(query.shape)} does not match tokens "
                                 f"{tuple(tokens.shape)}: expected (batch, D)")
            tokens = torch.cat([query.unsqueeze(1).to(tokens.dtype), tokens], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        if query is not None:
            tokens = tokens[:, 1:]
        pooled = self.norm(tokens).mean(dim=1)
        return self.last_layer(F.normalize(pooled, dim=-1))
