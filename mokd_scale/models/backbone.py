"""A timm backbone behind one interface: a pooled vector and a token grid.

Any timm model whose `forward_features` gives a token grid works; what kind it is comes from timm's
own interfaces, not from a list of module names (README "Backbones" has the families):

- the layout of `forward_features`: an NCHW feature map (CNNs), an NHWC map (`model.output_fmt`,
  Swin) or a (B, N, C) token sequence whose first `model.num_prefix_tokens` tokens (class,
  distillation, register tokens) are not on the grid (ViT, DeiT, EVA);
- a class token (`model.cls_token`, pooled with `global_pool='token'`): pooled = the class token
  after the final norm (`forward_head(pre_logits=True)`); otherwise pooled = the mean of the grid;
- the arguments the model's constructor takes: `dynamic_img_size=True` where it is one (local crops
  are smaller than global crops), `drop_path_rate` only where it is one.

The timm model is held as `Backbone.model` on purpose: exporting a trained backbone strips
the prefix `backbone.model.` and loads the rest strictly into
`timm.create_model(arch, num_classes=0, **timm_kwargs(arch, arch_kwargs))`.
"""
from __future__ import annotations

import inspect
import json
import math
import types
from typing import NamedTuple

import timm
import torch
from torch import nn
from timm.models import is_model
from timm.models.vision_transformer import VisionTransformer

from mokd_scale.models.positions import resize_position_grid

# forward_features layouts: a feature map with channels first or last, or a token sequence.
NCHW, NHWC, NLC = "NCHW", "NHWC", "NLC"


class BackboneOutput(NamedTuple):
    pooled: torch.Tensor  # (B, pooled_dim)
    tokens: torch.Tensor  # (B, h*w, token_dim), row-major over the grid
    grid: tuple[int, int]  # (h, w)


class BackboneKind(NamedTuple):
    """What MOKD needs to know of a timm model, read from the model itself."""
    layout: str  # NCHW, NHWC or NLC: the layout of forward_features
    prefix_tokens: int  # NLC: tokens in front of the grid (class, distillation, registers); 0 for maps
    class_token: bool  # pooled (and the query sent to the partner) = class token after the final norm
    token_dim: int  # channels of one grid position
    pooled_dim: int

    @property
    def is_token_model(self) -> bool:
        """A token sequence (ViT-like): its width is the pair's search width when no width is set."""
        return self.layout == NLC


class UnsupportedBackbone(ValueError):
    """A timm model MOKD cannot use; `field` is the NetworkConfig field to change (arch or arch_kwargs)."""

    def __init__(self, message: str, field: str = "arch"):
        super().__init__(message)
        self.field = field


class ModelFacts(NamedTuple):
    """Facts of the model as timm builds it from the user's arch_kwargs alone."""
    arguments: frozenset  # constructor arguments the model class names
    class_token: bool
    global_pool: object  # the model's `global_pool` (a string for token models, a module for CNNs)


def check_arch(arch: str) -> None:
    if not is_model(arch):
        raise ValueError(f"unknown timm architecture {arch!r} (networks.*.arch): "
                         "use a name from timm.list_models(), e.g. vit_small_patch16_224 or resnet50")


# Answers of the meta-device probes below, per (question, arch, arch_kwargs, ...): a process asks
# them for every network it builds (student, teacher, checks), and the answers never change.
_PROBES: dict[tuple, object] = {}


def probed(compute, arch: str, arch_kwargs: dict | None, *more):
    """compute(arch, arch_kwargs, *more), once per process for equal arguments (errors are not kept)."""
    key = (compute.__name__, arch, json.dumps(arch_kwargs or {}, sort_keys=True, default=repr), *more)
    if key not in _PROBES:
        _PROBES[key] = compute(arch, dict(arch_kwargs or {}), *more)
    return _PROBES[key]


def model_facts(arch: str, arch_kwargs: dict) -> ModelFacts:
    return probed(_model_facts, arch, arch_kwargs)


def _model_facts(arch: str, arch_kwargs: dict) -> ModelFacts:
    check_arch(arch)
    with torch.device("meta"):  # shapes only: no memory, no init cost, the CPU generator untouched
        model = timm.create_model(arch, pretrained=False, num_classes=0, **arch_kwargs)
    return ModelFacts(constructor_arguments(type(model)), has_class_token(model), getattr(model, "global_pool", None))


def constructor_arguments(model_class: type) -> frozenset:
    """Names the model's __init__ takes, following **kwargs up the class hierarchy (DeiT's distilled
    ViT passes them to VisionTransformer). A **kwargs that goes nowhere named (HRNet's, which only
    overrides its config) adds nothing: the argument is not taken."""
    names = set()
    for klass in model_class.__mro__:
        if klass is nn.Module:
            break
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names.update(p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return frozenset(names)


def has_class_token(model: nn.Module) -> bool:
    prefix_tokens = getattr(model, "num_prefix_tokens", 0) or 0
    return isinstance(getattr(model, "cls_token", None), torch.Tensor) and prefix_tokens >= 1


def timm_kwargs(arch: str, arch_kwargs: dict) -> dict:
    """create_model's arguments for this backbone besides num_classes=0 and drop_path_rate
    (also what an exported backbone records, so that timm rebuilds the same model).
    The user's arch_kwargs win over both defaults added here."""
    kwargs = dict(arch_kwargs or {})
    facts = model_facts(arch, kwargs)
    if "dynamic_img_size" in facts.arguments and "strict_img_size" not in kwargs:
        # Local crops (96 px) are smaller than the model's own size: the model must follow the input
        # (ViTs interpolate their position embedding, Swin builds its attention masks per size).
        kwargs.setdefault("dynamic_img_size", True)
    if facts.class_token and facts.global_pool != "token" and "global_pool" in facts.arguments \
            and "global_pool" not in kwargs:
        # A class token pooled by the mean (EVA's default): pool by the class token as DINO and
        # upstream EVA-02 do; timm then puts the final norm before pooling, on every token.
        kwargs["global_pool"] = "token"
    return kwargs


def create_timm_model(arch: str, arch_kwargs: dict, drop_path_rate: float) -> nn.Module:
    """Randomly initialised timm model without classifier; never downloads weights. `drop_path_rate`
    goes only to models that take it (HRNet has no stochastic depth)."""
    kwargs = timm_kwargs(arch, arch_kwargs)
    if "drop_path_rate" in model_facts(arch, arch_kwargs).arguments:
        kwargs["drop_path_rate"] = drop_path_rate
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def native_image_size(model: nn.Module) -> tuple[int, int]:
    """The input size the model is built for (a fixed-size model takes no other)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-2:]
    return tuple(size)


def backbone_kind(arch: str, arch_kwargs: dict) -> BackboneKind:
    """The kind of backbone, from a forward on the meta device at the model's own input size
    (cached per arch and arch_kwargs). Raises UnsupportedBackbone when there is no token grid."""
    return probed(_backbone_kind, arch, arch_kwargs)


def _backbone_kind(arch: str, arch_kwargs: dict) -> BackboneKind:
    with torch.device("meta"):
        model = create_timm_model(arch, arch_kwargs, 0.0).eval()  # eval: BatchNorm must not need a batch
        features = model.forward_features(torch.empty(2, 3, *native_image_size(model)))
        layout = features_layout(model, features, arch)
        class_token = layout == NLC and has_class_token(model)
        if class_token and getattr(model, "global_pool", None) != "token":
            raise UnsupportedBackbone(
                f"{arch} with arch_kwargs {arch_kwargs}: MOKD pools a model with a class token by its class token "
                f"(global_pool='token'), got global_pool={model.global_pool!r}: remove global_pool from "
                "arch_kwargs (or set class_token=False for the mean of the grid)",
                field="arch_kwargs" if "global_pool" in arch_kwargs else "arch")
        pooled_dim = model.forward_head(features, pre_logits=True).shape[-1] if class_token else None
    token_dim = features.shape[1] if layout == NCHW else features.shape[-1]
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0) if layout == NLC else 0
    return BackboneKind(layout, prefix, class_token, token_dim, pooled_dim or token_dim)


def features_layout(model: nn.Module, features, arch: str) -> str:
    if isinstance(features, torch.Tensor) and features.ndim == 4:
        return NHWC if getattr(model, "output_fmt", NCHW) == NHWC else NCHW
    if isinstance(features, torch.Tensor) and features.ndim == 3:
        return NLC
    shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
    raise UnsupportedBackbone(f"{arch} gives no token grid: its forward_features returns {shape}, not a "
                              "(B, C, h, w) or (B, h, w, C) feature map or a (B, N, C) token sequence")


def is_vit_arch(arch: str, arch_kwargs: dict | None = None) -> bool:
    """Old name, kept for callers outside models/ (the ops bench): a ViT-like backbone pooled by its
    class token."""
    check_arch(arch)
    return backbone_kind(arch, arch_kwargs or {}).class_token


def token_grid(arch: str, arch_kwargs: dict, image_size: int) -> tuple[int, int]:
    """The (h, w) token grid the backbone gives for a square image of `image_size` pixels, found by
    running it on the meta device (no memory, no weights): padding and dilation (output_stride)
    are accounted for exactly, whatever the architecture."""
    return probed(_token_grid, arch, arch_kwargs, image_size)


def _token_grid(arch: str, arch_kwargs: dict, image_size: int) -> tuple[int, int]:
    with torch.device("meta"):
        backbone = Backbone(arch, arch_kwargs).eval()
        return backbone(torch.empty(2, 3, image_size, image_size)).grid


def sequence_grid(model: nn.Module, image_size, count: int) -> tuple[int, int]:
    """The (h, w) grid of a token sequence's `count` grid tokens for an image of `image_size`:
    the patch embedding's own answer when it has one, else the last feature's reduction."""
    patch_embed = getattr(model, "patch_embed", None)
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
    else:
        reduction = model.feature_info[-1]["reduction"]
        grid = (math.ceil(image_size[0] / reduction), math.ceil(image_size[1] / reduction))
    if grid[0] * grid[1] != count:
        raise RuntimeError(f"{count} tokens do not fill the {grid} grid of a {tuple(image_size)} image")
    return grid


def use_dino_position_resize(vit: nn.Module) -> None:
    """Make a timm ViT resize its position embedding for other crop sizes (the 96-px local crops) as
    DINO and the MOKD authors do (by scale factor, no antialiasing) instead of timm's way (to a size,
    antialiased): the same weights then give the authors' features on a local crop. Only plain ViTs
    (one class token, its own position, no register tokens) take this path; others keep timm's."""
    plain = (isinstance(vit, VisionTransformer)
             and getattr(vit, "cls_token", None) is not None and getattr(vit, "reg_token", None) is None
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
    """Class-token model: pooled = class token after the final norm, tokens = the grid tokens.
    Otherwise (CNN, Swin, token models without class token): pooled = mean of the grid tokens."""

    def __init__(self, arch: str, arch_kwargs: dict | None = None, drop_path_rate: float = 0.0,
                 grad_checkpointing: bool = False):
        super().__init__()
        check_arch(arch)
        self.arch = arch
        self.kind = backbone_kind(arch, arch_kwargs or {})
        self.model = create_timm_model(arch, arch_kwargs or {}, drop_path_rate)
        use_dino_position_resize(self.model)
        self._channels_last = False
        self.pooled_dim = self.kind.pooled_dim
        self.token_dim = self.kind.token_dim
        if grad_checkpointing:
            # Recompute backbone activations in backward: ViT-L with 10 crops does not fit otherwise.
            self.model.set_grad_checkpointing(True)

    @property
    def has_class_token(self) -> bool:
        return self.kind.class_token

    @property
    def is_token_model(self) -> bool:
        return self.kind.is_token_model

    @property
    def is_vit(self) -> bool:
        """Old name, kept for callers outside models/ (learner, linear probe): pooled by a class token."""
        return self.kind.class_token

    @property
    def channels_last(self) -> bool:
        """NHWC activations (the Learner asks for them for CNNs in bf16 on GPUs); only an NCHW
        feature-map model takes them, since only its convolutions gain."""
        return self._channels_last

    @channels_last.setter
    def channels_last(self, wanted: bool) -> None:
        self._channels_last = bool(wanted) and self.kind.layout == NCHW

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        if self.channels_last:
            # Convolutions follow their input's layout. The weights keep theirs: DeepSpeed views
            # parameters as bytes (stride(-1) must be 1) and ZeRO re-views them in flat buffers,
            # and the teacher's must match the student's for the multi-tensor EMA.
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.model.forward_features(images)
        if self.kind.layout == NLC:
            return self._sequence_output(features, images.shape[-2:])
        return self._map_output(features)

    def _sequence_output(self, features: torch.Tensor, image_size) -> BackboneOutput:
        tokens = features[:, self.kind.prefix_tokens:]
        grid = sequence_grid(self.model, image_size, tokens.shape[1])
        if self.kind.class_token:
            pooled = self.model.forward_head(features, pre_logits=True)
        else:
            pooled = tokens.mean(dim=1)
        return BackboneOutput(pooled, tokens, grid)

    def _map_output(self, features: torch.Tensor) -> BackboneOutput:
        if features.ndim != 4:
            raise RuntimeError(f"{self.arch}: expected a {self.kind.layout} feature map, got shape "
                               f"{tuple(features.shape)}")
        if self.kind.layout == NHWC:
            tokens, grid = features.flatten(1, 2), (features.shape[1], features.shape[2])
            return BackboneOutput(tokens.mean(dim=1), tokens, grid)
        pooled = features.mean(dim=(2, 3))
        tokens = features.flatten(2).transpose(1, 2)
        return BackboneOutput(pooled, tokens, (features.shape[2], features.shape[3]))
