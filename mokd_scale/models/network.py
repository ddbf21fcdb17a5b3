"""One MOKD network: backbone + projection head + search head (student or EMA teacher)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mokd_scale.models.backbone import Backbone, create_timm_model, is_vit_arch
from mokd_scale.models.last_layer import LAST_LAYER_PARAMETERS
from mokd_scale.models.projection_head import ProjectionHead
from mokd_scale.models.search_head import SearchHead


class NetworkOutput(NamedTuple):
    """Outputs for one batch of same-size crops, in the network's compute dtype."""
    proj: torch.Tensor  # (B, K) projection-head logits
    search: torch.Tensor  # (B, K) search-head logits without a query
    summary: torch.Tensor  # (B, D) detached query for the partner
    search_tokens: torch.Tensor  # (B, N, D) search-head input (projected + position), for cross-search


class MokdNetwork(nn.Module):
    def __init__(self, backbone: Backbone, projection_head: ProjectionHead, search_head: SearchHead):
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head
        self.search_head = search_head

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        features = self.backbone(images)
        projected = self.search_head.project(features.tokens)
        search_tokens = projected + self.search_head.position_embedding(features.grid)
        return NetworkOutput(
            proj=self.projection_head(features.pooled),
            search=self.search_head(search_tokens),
            summary=self.search_head.summary(features, projected),
            search_tokens=search_tokens,
        )

    def last_layer_parameter_names(self) -> list[str]:
        """Names of both heads' weight-normed last layers (the optimizer's "last_layer" group,
        frozen during the first epoch); a frozen scale is listed but has requires_grad=False."""
        names = [f"{head}.{name}" for head in ("projection_head", "search_head") for name in LAST_LAYER_PARAMETERS]
        missing = set(names) - {name for name, _ in self.named_parameters()}
        assert not missing, f"last-layer parameters renamed: {missing}"
        return names

    def no_weight_decay_parameter_names(self) -> list[str]:
        """Biases, norm weights and the weight-norm scales (a gain, not a weight)."""
        return [name for name, p in self.named_parameters()
                if p.ndim <= 1 or name.endswith(".bias") or name.endswith("last_layer.scale")]


def build_network(net_cfg, mokd_cfg, search_dim: int) -> MokdNetwork:
    """A randomly initialised network from networks.a / networks.b and the mokd section."""
    backbone = Backbone(net_cfg.arch, net_cfg.arch_kwargs, net_cfg.drop_path_rate, net_cfg.grad_checkpointing)
    projection_head = ProjectionHead(
        backbone.pooled_dim, mokd_cfg.proj_hidden_dim, mokd_cfg.proj_bottleneck_dim, mokd_cfg.out_dim,
        use_bn=net_cfg.use_bn_in_head, freeze_scale=net_cfg.freeze_weight_norm_scale)
    search_head = SearchHead(
        backbone.token_dim, search_dim, mokd_cfg.search_depth, mokd_cfg.search_head_dim, mokd_cfg.out_dim,
        summary_is_pooled=backbone.is_vit, freeze_scale=net_cfg.freeze_weight_norm_scale)
    return MokdNetwork(backbone, projection_head, search_head)


def pair_search_dim(cfg) -> int:
    """The search heads' shared width D: mokd.search_dim, or else the ViT's embed dim of the pair."""
    if cfg.mokd.search_dim > 0:
        return cfg.mokd.search_dim
    widths = {vit_width(net) for net in (cfg.networks.a, cfg.networks.b) if is_vit_arch(net.arch)}
    if not widths:
        raise ValueError("both networks are CNNs: set mokd.search_dim (e.g. 768) to give their search "
                         "heads a shared width")
    if len(widths) > 1:
        raise ValueError(f"the two ViTs have different widths {sorted(widths)}: set mokd.search_dim explicitly")
    return widths.pop()


def vit_width(net_cfg) -> int:
    with torch.device("meta"):  # no memory, no init cost: only the width is needed
        return create_timm_model(net_cfg.arch, net_cfg.arch_kwargs, 0.0).num_features
