"""A timm backbone (ViT or CNN) behind one interface: a pooled vector and a token grid.

The timm model is held as `Backbone.model` on purpose: exporting a trained backbone strips
the prefix `backbone.model.` and loads the rest strictly into
`timm.create_model(arch, num_classes=0, **arch_kwargs)`.
"""
from __future__ import annotations

import types
from typing import NamedTuple

import timm
import torch
from torch import nn
from timm.models import is_model, model_entrypoint

from mokd_scale.models.positions import resize_position_grid

# timm modules whose models are plain ViTs (class token + patch tokens, `dynamic_img_size`).
VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # (B, pooled_dim)
    tokens: torch.Tensor  # (B, h*w, token_dim), row-major over the grid
    grid: tuple[int, int]  # (h, w)


def is_vit_arch(arch: str) -> bool:
    if not is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (networks.*.arch): "
                         "use a name from timm.list_models(), e.g. vit_small_patch16_224 or resnet50")
    return model_entrypoint(arch).__module__ in VIT_MODULES


def timm_kwargs(arch: str, arch_kwargs: dict) -> dict:
    """create_model's arguments for this backbone besides num_classes=0 and drop_path_rate
    (also what an exported backbone records, so that timm rebuilds the same model)."""
    kwargs = dict(arch_kwargs)
    if is_vit_arch(arch):
        # Local crops (96 px) are smaller than the model's default size: interpolate pos-embeds.
        kwargs.setdefault("dynamic_img_size", True)
    return kwargs


def create_timm_model(arch: str, arch_kwargs: dict, drop_path_rate: float) -> nn.Module:
    """Randomly initialised timm model without classifier; never downloads weights."""
    return timm.create_model(arch, pretrained=False, num_classes=0, drop_path_rate=drop_path_rate,
                             **timm_kwargs(arch, arch_kwargs))


def token_grid(arch: str, arch_kwargs: dict, image_size: int) -> tuple[int, int]:
    """The (h, w) token grid the backbone gives for a square image of `image_size` pixels, found by
    running the architecture on the meta device (no memory, no weights): padding and dilation
    (output_stride) are accounted for exactly, whatever the architecture."""
    with torch.device("meta"):
        model = create_timm_model(arch, arch_kwargs, 0.0).eval()  # BatchNorm must not need a batch
        if is_vit_arch(arch):
            return tuple(model.patch_embed.dynamic_feat_size((image_size, image_size)))
        features = model.forward_features(torch.empty(1, 3, image_size, image_size))
    return tuple(features.shape[-2:])


def use_dino_position_resize(vit: nn.Module) -> None:
    """Make a timm ViT resize its position embedding for other crop sizes (the 96-px local crops) as
    DINO and the MOKD authors do (by scale factor, no antialiasing) instead of timm's way (to a size,
    antialiased): the same weights then give the authors' features on a local crop. Only plain ViTs
    (one class token, its own position, no register tokens) take this path; others keep timm's."""
    plain = (getattr(vit, "cls_token", None) is not None and getattr(vit, "reg_token", None) is None
             and not getattr(vit, "no_embed_class", True) and getattr(vit, "num_prefix_tokens", 0) == 1
             and getattr(vit, "dynamic_img_size", False))
    if plain:
        vit._pos_embed = types.MethodType(dino_pos_embed, vit)


def dino_pos_embed(vit: nn.Module, patches: torch.Tensor) -> torch.Tensor:
    """Class token in front of the (B, h, w, D) patch grid, plus the resized position embedding."""
    batch, height, width, dim = patches.shape
    grid = resize_position_grid(vit.pos_embed[:, 1:], vit.patch_embed.grid_size, (height, width))
    positions = torch.cat([vit.pos_embed[:, :1], grid], dim=1)
    tokens = torch.cat([vit.cls_token.expand(batch, -1, -1), patches.reshape(batch, height * width, dim)], dim=1)
    return vit.pos_drop(tokens + positions)


class Backbone(nn.Module):
    """ViT: pooled = class token after the final norm, tokens = patch tokens.
    CNN: pooled = global average of the last stage, tokens = its feature map flattened."""

    def __init__(self, arch: str, arch_kwargs: dict | None = None, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        self.arch = arch
        self.is_vit = is_vit_arch(arch)
        self.model = create_timm_model(arch, arch_kwargs or {}, drop_path_rate)
        if self.is_vit and getattr(self.model, "global_pool", None) != "token":
            raise ValueError(f"{arch} with arch_kwargs {arch_kwargs}: MOKD needs a ViT pooled by its class "
                             "token (global_pool='token', class_token=True)")
        if self.is_vit:
            use_dino_position_resize(self.model)
        self.pooled_dim = self.model.num_features
        self.token_dim = self.model.num_features
        if grad_checkpointing:
            # Recompute backbone activations in backward: ViT-L with 10 crops does not fit otherwise.
            self.model.set_grad_checkpointing(True)

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        features = self.model.forward_features(images)
        if self.is_vit:
            return self._vit_output(features, images.shape[-2:])
        return self._cnn_output(features)

    def _vit_output(self, features: torch.Tensor, image_size) -> BackboneOutput:
        pooled = self.model.forward_head(features, pre_logits=True)
        tokens = features[:, self.model.num_prefix_tokens:]
        grid = tuple(self.model.patch_embed.dynamic_feat_size(tuple(image_size)))
        if grid[0] * grid[1] != tokens.shape[1]:
            raise RuntimeError(f"{self.arch}: {tokens.shape[1]} patch tokens do not fill a {grid} grid")
        return BackboneOutput(pooled, tokens, grid)

    def _cnn_output(self, features: torch.Tensor) -> BackboneOutput:
        if features.ndim != 4:
            raise ValueError(f"{self.arch}: expected a (B, C, h, w) feature map, got shape "
                             f"{tuple(features.shape)}; only ViTs and CNNs are supported")
        pooled = features.mean(dim=(2, 3))
        tokens = features.flatten(2).transpose(1, 2)
        return BackboneOutput(pooled, tokens, (features.shape[2], features.shape[3]))
