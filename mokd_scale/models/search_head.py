"""Search head ("T-head", cross-attention feature search).

Backbone tokens are projected to the pair's shared width D (a 1x1 convolution, written as a
Linear over tokens), given a learned position embedding and, optionally, a query token in
front: the partner network's detached summary of a local crop, without a position embedding.
Pre-norm transformer blocks let the patch tokens attend to the query; a closing LayerNorm,
the query dropped, the patch tokens averaged, and a weight-normalised linear layer gives K
logits.

What the authors' code runs, and this head does by default (docs/fidelity.md has file:line):
- every LayerNorm has eps 1e-6;
- the position embedding is stored on the backbone's own token grid at the global crop size
  (14x14 for a ViT/16 at 224 px, 7x7 for a stride-32 ResNet) and resized per crop by scale
  factor ((h + 0.1) / base_h, as DINO resizes a ViT's position embedding), not to a size;
- the pooled feature goes into the last layer as it is. `l2_normalize=True` normalises it
  first, as the projection head does (an option: it bounds the logits to the weight-norm scale).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from timm.models.vision_transformer import Block

from mokd_scale.models.last_layer import WeightNormLinear
from mokd_scale.models.positions import resize_position_grid
from mokd_scale.models.projection_head import init_linear

NORM_EPS = 1e-6


class SearchHead(nn.Module):
    def __init__(self, token_dim: int, dim: int, depth: int, num_heads: int, out_dim: int,
                 base_grid: tuple[int, int], summary_is_pooled: bool, freeze_scale: bool = False,
                 l2_normalize: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"search width {dim} (mokd.search_dim or the token model's width) is not divisible into "
                             f"{num_heads} heads (mokd.search_head_dim)")
        # Tokens already of width D (the pair's token model) need no projection; a 1x1 projection keeps the default
        # (Kaiming-uniform) initialisation of a convolution.
        self.channel_proj = nn.Identity() if token_dim == dim else nn.Linear(token_dim, dim)
        self.base_grid = tuple(base_grid)
        self.position = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1], dim))
        norm = partial(nn.LayerNorm, eps=NORM_EPS)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(depth))
        self.norm = norm(dim)
        self.last_layer = WeightNormLinear(dim, out_dim, freeze_scale)
        self.summary_is_pooled = summary_is_pooled
        self.l2_normalize = l2_normalize
        init_linear(self.blocks)
        nn.init.trunc_normal_(self.position, std=0.02)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.channel_proj(tokens)

    def position_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, h*w, D): the stored embedding, or its resize by scale factor to `grid` (models/positions.py)."""
        return resize_position_grid(self.position, self.base_grid, grid)

    def embed(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Backbone tokens (B, h*w, C) on `grid` -> the head's input (B, h*w, D)."""
        return self.project(tokens) + self.position_embedding(grid)

    def summary(self, pooled: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """The D-wide query this network sends to its partner (always detached).
        A class-token model (ViT): its class token after the final norm; any other backbone (CNN,
        Swin, a ViT without class token): the mean of its projected tokens."""
        if self.summary_is_pooled:
            return self.channel_proj(pooled).detach()
        return projected.mean(dim=1).detach()

    def forward(self, embedded: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """embedded: (B, N, D) from embed(); query: (B, D) or None. Returns (B, K) logits."""
        tokens = embedded
        if query is not None:
            if query.shape != (embedded.shape[0], embedded.shape[2]):
                raise ValueError(f"query of shape {tuple(query.shape)} does not match tokens "
                                 f"{tuple(embedded.shape)}: expected (batch, D)")
            tokens = torch.cat([query.unsqueeze(1).to(embedded.dtype), embedded], dim=1)
        for block in self.blocks:
            tokens = block(tokens)
        if query is not None:
            tokens = tokens[:, 1:]
        pooled = self.norm(tokens).mean(dim=1)
        if self.l2_normalize:
            pooled = F.normalize(pooled, dim=-1)
        return self.last_layer(pooled)
