"""One MOKD network: backbone + projection head + search head (student or EMA teacher).

A network has a search head only where a loss term uses it (method/objective.py: none for a network
alone or in `independent` mode, plain DINO).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from torch import nn

from mokd_scale.method.objective import uses_search_heads
from mokd_scale.models.backbone import Backbone, backbone_kind, token_grid
from mokd_scale.models.last_layer import LAST_LAYER_PARAMETERS
from mokd_scale.models.projection_head import ProjectionHead
from mokd_scale.models.search_head import SearchHead


class NetworkOutput(NamedTuple):
    """Outputs for one batch of same-size crops, in the network's compute dtype.
    The search fields are None for a network without a search head."""
    proj: torch.Tensor  # (B, K) projection-head logits
    search: torch.Tensor | None  # (B, K) search-head logits without a query
    summary: torch.Tensor | None  # (B, D) detached query for the partner
    search_tokens: torch.Tensor | None  # (B, N, D) search-head input (projected + position), for cross-search
    pooled: torch.Tensor  # (B, pooled dim) the backbone's pooled feature (KoLeo reads it)


class MokdNetwork(nn.Module):
    def __init__(self, backbone: Backbone, projection_head: ProjectionHead, search_head: SearchHead | None):
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head
        self.search_head = search_head

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        features = self.backbone(images)
        proj = self.projection_head(features.pooled)
        if self.search_head is None:
            return NetworkOutput(proj, None, None, None, features.pooled)
        projected = self.search_head.project(features.tokens)
        search_tokens = projected + self.search_head.position_embedding(features.grid)
        return NetworkOutput(proj=proj, search=self.search_head(search_tokens),
                             summary=self.search_head.summary(features.pooled, projected),
                             search_tokens=search_tokens, pooled=features.pooled)

    def head_names(self) -> tuple[str, ...]:
        return ("projection_head",) if self.search_head is None else ("projection_head", "search_head")

    def last_layer_parameter_names(self) -> list[str]:
        """Names of the heads' weight-normed last layers (dropped from the optimizer step while the
        last layer is frozen); a frozen scale is listed but has requires_grad=False."""
        names = [f"{head}.{name}" for head in self.head_names() for name in LAST_LAYER_PARAMETERS]
        missing = set(names) - {name for name, _ in self.named_parameters()}
        assert not missing, f"last-layer parameters renamed: {missing}"
        return names

    def no_weight_decay_parameter_names(self) -> list[str]:
        """Biases and other 1-D tensors (norm weights), as DINO and the authors exclude them. The
        weight-norm scale, shaped (K, 1), is decayed when trainable, as in the authors' code."""
        return [name for name, p in self.named_parameters() if p.ndim <= 1 or name.endswith(".bias")]


def build_network(config, name: str, teacher: bool = False, search_dim: int | None = None) -> MokdNetwork:
    """Network `name` of a recipe, randomly initialised. `search_dim` saves working out the cohort's
    search width again when the caller has it.

    A teacher never drops paths (stochastic depth would make its targets and centres random)
    and needs no gradient checkpointing; its parameters are the student's, in the same order."""
    net_cfg, mokd_cfg = config.networks[name], config.mokd
    if teacher:
        net_cfg = dataclasses.replace(net_cfg, drop_path_rate=0.0, grad_checkpointing=False)
    with_search_head = uses_search_heads(config)
    if search_dim is None and with_search_head:
        search_dim = pair_search_dim(config)
    backbone = Backbone(net_cfg.arch, net_cfg.arch_kwargs, net_cfg.drop_path_rate, net_cfg.grad_checkpointing)
    projection_head = ProjectionHead(
        backbone.pooled_dim, mokd_cfg.proj_hidden_dim, mokd_cfg.proj_bottleneck_dim, mokd_cfg.out_dim,
        use_bn=net_cfg.proj_batchnorm, freeze_scale=net_cfg.proj_freeze_scale)
    search_head = None
    if with_search_head:
        search_head = SearchHead(
            backbone.token_dim, search_dim, mokd_cfg.search_depth, search_heads(search_dim, mokd_cfg),
            mokd_cfg.out_dim, base_grid=token_grid(net_cfg.arch, net_cfg.arch_kwargs, config.data.global_crop_size),
            summary_is_pooled=backbone.has_class_token, freeze_scale=net_cfg.search_freeze_scale,
            l2_normalize=mokd_cfg.search_l2_normalize)
    return MokdNetwork(backbone, projection_head, search_head)


def search_heads(search_dim: int, mokd_cfg) -> int:
    if search_dim % mokd_cfg.search_head_dim != 0:
        raise ValueError(f"search width {search_dim} (mokd.search_dim or the token model's width) is not a multiple of "
                         f"mokd.search_head_dim={mokd_cfg.search_head_dim}")
    return search_dim // mokd_cfg.search_head_dim


def pair_search_dim(cfg) -> int:
    """The search heads' shared width D (every network queries every other's head): mokd.search_dim, or
    else the width of the recipe's token models (ViT, DeiT, EVA: a (B, N, C) token sequence), whose
    tokens then need no projection (0 without search heads: one network, or independent mode)."""
    if not uses_search_heads(cfg):
        return 0
    if cfg.mokd.search_dim > 0:
        return cfg.mokd.search_dim
    kinds = [backbone_kind(net.arch, net.arch_kwargs) for net in cfg.networks.values()]
    widths = {kind.token_dim for kind in kinds if kind.is_token_model}
    if not widths:
        raise ValueError("no network is a token model (ViT, DeiT, EVA): set mokd.search_dim (e.g. 768) to give "
                         "the search heads a shared width")
    if len(widths) > 1:
        raise ValueError(f"the token models (ViTs) have different widths {sorted(widths)}: set mokd.search_dim "
                         f"to the width every search head shares (e.g. --set mokd.search_dim={max(widths)})")
    return widths.pop()
