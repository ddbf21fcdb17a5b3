"""Attention maps of trained networks (mokd-visualize draws them): where a ViT's class token looks, and
where a partner's query falls in a network's search head, MOKD's cross-attention search.

The weights are read from timm's own attention modules (ViT, DeiT, EVA blocks and the search head's
blocks alike), as timm's AttentionExtract does with hooks: with `fused_attn` off, a module computes
softmax(q k^T / sqrt(d)) explicitly and passes it through its `attn_drop`, whose forward hook then sees
the weights (the networks are in eval mode, so dropout is the identity). The fused and explicit paths
give the same outputs to fp32 rounding; `fused_attn` is restored afterwards.

- class_token_attention: a class-token model's last block, the class token's row over the grid
  tokens, per head (DINO's attention maps). Tokens off the grid (the class token itself, registers,
  a distillation token) keep the rest of the row.
- search_attention: network Y's search head run exactly as the cross-search term runs it
  (mokd_scale/method/forward.py::cross_search_targets): Y's global-crop tokens with the query, network
  X's summary of a local crop, in front. Every block's weights are kept; `query_rows` gives the query
  token's row over Y's grid, one block or the mean over blocks. After the last block the query is
  dropped and the grid tokens averaged, so the query reaches Y's logits through the grid tokens'
  attention to it; its own row says which of Y's positions it gathers, block by block.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Sequence

import torch
from torch import nn

from mokd_scale.method.forward import TeacherOutputs, cross_search_targets


class UnsupportedAttention(ValueError):
    """A network whose attention weights cannot be read; the message says why."""


class GridAttention(NamedTuple):
    maps: torch.Tensor  # (..., heads, h, w): one attention row's weights on the grid tokens
    rest: torch.Tensor  # (..., heads): the row's weight on tokens off the grid; maps sum + rest = 1
    grid: tuple[int, int]


@contextlib.contextmanager
def captured_attention(modules: Sequence[nn.Module]):
    """Yields a list that receives the (B, heads, N, N) attention weights of every forward of
    `modules`, in call order (fp32, detached)."""
    captured: list[torch.Tensor] = []
    saved, handles = [], []
    for module in modules:
        if not isinstance(getattr(module, "attn_drop", None), nn.Module) or not hasattr(module, "fused_attn"):
            raise UnsupportedAttention(f"{type(module).__name__} computes attention without timm's attn_drop / "
                                       "fused_attn, so its weights cannot be read")
        saved.append(module.fused_attn)
        module.fused_attn = False
        handles.append(module.attn_drop.register_forward_hook(
            lambda _module, _inputs, weights: captured.append(weights.detach().float())))
    try:
        yield captured
    finally:
        for module, fused, handle in zip(modules, saved, handles):
            module.fused_attn = fused
            handle.remove()


def last_attention(backbone) -> nn.Module:
    """The attention module of a class-token model's last block."""
    blocks = getattr(backbone.model, "blocks", None)
    if not backbone.has_class_token or not isinstance(blocks, nn.Module) or len(blocks) == 0:
        raise UnsupportedAttention(f"{backbone.arch} has no class token attending over blocks of tokens "
                                   "(class-token maps are for ViT-like models)")
    attention = getattr(blocks[-1], "attn", None)
    if attention is None:
        raise UnsupportedAttention(f"the last block of {backbone.arch} has no `attn` module")
    return attention


@torch.no_grad()
def class_token_attention(backbone, images: torch.Tensor) -> GridAttention:
    """`backbone` (models/backbone.py::Backbone, eval mode) on `images` -> the last block's class-token
    row per head: maps (B, heads, h, w)."""
    with captured_attention([last_attention(backbone)]) as captured:
        output = backbone(images)
    weights = captured[-1]  # (B, heads, N, N); the class token is timm's token 0
    prefix = backbone.kind.prefix_tokens
    row = weights[:, :, 0]
    batch, heads = row.shape[:2]
    return GridAttention(row[:, :, prefix:].reshape(batch, heads, *output.grid), row[:, :, :prefix].sum(-1),
                         output.grid)


class SearchAttention(NamedTuple):
    weights: torch.Tensor  # (views, B, blocks, heads, 1 + N, 1 + N); token 0 is the query
    grid: tuple[int, int]  # the searched network's global-crop grid (h * w = N)

    def query_rows(self, block: int | None = None) -> GridAttention:
        """The query's row over the grid, maps (views, B, heads, h, w): block `block` (negative counts
        from the last), or the mean over blocks when None."""
        weights = self.weights.mean(dim=2) if block is None else self.weights[:, :, block]
        row = weights[..., 0, :]
        return GridAttention(row[..., 1:].reshape(*row.shape[:-1], *self.grid), row[..., 0], self.grid)


@torch.no_grad()
def search_attention(searched: nn.Module, querying: nn.Module, global_images: torch.Tensor,
                     local_views: torch.Tensor) -> SearchAttention:
    """`searched` (network Y, a MokdNetwork in eval mode) on the global crops (B, 3, H, W), queried by
    `querying` (network X) with its summaries of the local crops (views, B, 3, h, w)."""
    if searched.search_head is None or querying.search_head is None:
        raise UnsupportedAttention("the networks have no search heads (one network, or independent mode)")
    views, batch = local_views.shape[:2]
    tokens = searched(global_images).search_tokens
    queries = querying(local_views.flatten(0, 1)).summary.view(views, batch, -1)
    targets = TeacherOutputs(proj=None, search=None, global1_search_tokens=tokens.float())
    with captured_attention([block.attn for block in searched.search_head.blocks]) as captured:
        cross_search_targets(searched, targets, queries)
    weights = torch.stack(captured, dim=1)  # (views * B, blocks, heads, 1 + N, 1 + N)
    return SearchAttention(weights.view(views, batch, *weights.shape[1:]), square_grid(tokens.shape[1]))


def square_grid(count: int) -> tuple[int, int]:
    """The grid of a square crop's `count` tokens (every backbone gives a square grid on a square crop)."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{count} search tokens are not a square grid: crops must be square")
    return side, side
