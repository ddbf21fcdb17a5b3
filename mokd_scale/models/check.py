"""Model-level checks of a recipe, before any process group or weight exists.

Both networks are built on the meta device (shapes only) and run at both crop sizes, so the
mistakes that would otherwise end a launched job in a timm traceback are reported at once, as a
ConfigError naming the key to change: an unknown architecture, arch_kwargs that belong to another
architecture, a family without a token grid, a class-token model not pooled by its class token, a
fixed-size model that cannot take both crop sizes, crops that do not fit a model's patches or leave
a CNN no feature map, a pair without a shared search width.

The per-network functions take a NetworkConfig-like object (`arch`, `arch_kwargs`,
`drop_path_rate`) and its key ("networks.a"), so they do not depend on how the recipe holds them.
"""
from __future__ import annotations

import torch

from mokd_scale.config import Config, ConfigError
from mokd_scale.models.backbone import (Backbone, UnsupportedBackbone, backbone_kind, create_timm_model, model_facts,
                                        native_image_size, timm_kwargs)
from mokd_scale.models.compile import backbone_blocks
from mokd_scale.models.network import build_network, pair_search_dim
from timm.models import is_model

# What building or running a timm model the wrong way raises: timm asserts on sizes and arguments,
# constructors raise TypeError/ValueError/KeyError on arguments, PyTorch RuntimeError on shapes
# (NotImplementedError, a meta kernel missing, is one), models without some attribute AttributeError.
MODEL_ERRORS = (AssertionError, RuntimeError, TypeError, ValueError, KeyError, IndexError, AttributeError)

CROP_FIELDS = ("global_crop_size", "local_crop_size")


def check_networks(config: Config) -> None:
    for name, net in config.networks.items():
        backbone = check_backbone(net, f"networks.{name}", config.data)
        if config.train.compile:
            check_compile(backbone, f"networks.{name}")
    check_term_weights(config)
    search_dim = checked_search_dim(config)
    for name in config.networks:
        try:
            with torch.device("meta"):
                build_network(config, name, search_dim=search_dim)
        except MODEL_ERRORS as error:
            raise ConfigError(f"networks.{name} cannot be built with this recipe: {first_line(error)}") from None


def check_term_weights(config: Config) -> None:
    """A term that is on needs what it reads: KoLeo, the micro-batch's nearest neighbours (2 samples or more)."""
    from mokd_scale.method.objective import term_weights
    if "koleo" in term_weights(config) and config.train.micro_batch_size < 2:
        raise ConfigError("mokd.term_weights.koleo > 0 needs train.micro_batch_size >= 2 (KoLeo compares the "
                          "samples of a micro-batch)")


def check_backbone(net, key: str, data) -> Backbone:
    """The backbone of `net` builds as MOKD builds it and gives a token grid at both crop sizes of `data`;
    returns it (on the meta device)."""
    check_build(net, key)
    backbone = checked_backbone(net, key)
    for field in CROP_FIELDS:
        check_crop(backbone, net, key, field, getattr(data, field))
    return backbone


def check_compile(backbone: Backbone, key: str) -> None:
    """train.compile knows how to split this backbone into regions (else the Learner would stop later)."""
    try:
        backbone_blocks(backbone)
    except ValueError as error:
        raise ConfigError(f"train.compile: {first_line(error)} ({key})") from None


def check_build(net, key: str) -> None:
    """timm builds the architecture from the user's arch_kwargs, then with what MOKD adds to them."""
    if not is_model(net.arch):
        raise ConfigError(f"{key}.arch: unknown timm architecture {net.arch!r}; use a name from "
                          f"timm.list_models(), e.g. vit_small_patch16_224 or resnet50")
    try:
        model_facts(net.arch, net.arch_kwargs)  # timm.create_model(arch, **arch_kwargs) on the meta device
    except MODEL_ERRORS as error:
        if net.arch_kwargs:
            raise ConfigError(f"{key}.arch_kwargs {net.arch_kwargs} do not fit {net.arch}: {first_line(error)}; "
                              f"set arguments of this architecture (--set {key}.arch_kwargs={{}} for its defaults)"
                              ) from None
        raise ConfigError(f"{key}.arch: timm cannot build {net.arch}: {first_line(error)}; pick another "
                          "architecture (README 'Backbones')") from None
    try:
        with torch.device("meta"):
            create_timm_model(net.arch, net.arch_kwargs, net.drop_path_rate)
    except MODEL_ERRORS as error:
        added = {k: v for k, v in timm_kwargs(net.arch, net.arch_kwargs).items() if k not in net.arch_kwargs}
        raise ConfigError(f"{key}.arch: {net.arch} builds from its arch_kwargs but not with what MOKD adds "
                          f"({added}, drop_path_rate={net.drop_path_rate}): {first_line(error)}; override them in "
                          f"{key}.arch_kwargs or set {key}.drop_path_rate=0") from None


def checked_backbone(net, key: str) -> Backbone:
    """The Backbone on the meta device; its kind comes from a forward at the model's own input size."""
    try:
        backbone_kind(net.arch, net.arch_kwargs)
    except UnsupportedBackbone as error:
        raise ConfigError(f"{key}.{error.field}: {first_line(error)}") from None
    except MODEL_ERRORS as error:
        raise ConfigError(f"{key}.arch: {net.arch} does not run at its own input size on the meta device: "
                          f"{first_line(error)}; pick another architecture (README 'Backbones')") from None
    try:
        with torch.device("meta"):
            return Backbone(net.arch, net.arch_kwargs, net.drop_path_rate).eval()  # eval: no batch needed
    except MODEL_ERRORS as error:
        raise ConfigError(f"{key}.arch: {net.arch} cannot be built as a backbone: {first_line(error)}") from None


def check_crop(backbone: Backbone, net, key: str, field: str, size: int) -> None:
    """A meta-device forward of the backbone on a crop of `size` px gives a token grid."""
    try:
        with torch.device("meta"):
            grid = backbone(torch.empty(2, 3, size, size)).grid
    except MODEL_ERRORS as error:
        raise ConfigError(crop_failure(backbone.model, net, key, field, size, error)) from None
    if min(grid) < 1:
        raise ConfigError(f"data.{field} ({size}) leaves {key} ({net.arch}) no feature map; use larger "
                          f"crops or a smaller output stride ({key}.arch_kwargs)")


def patch_size(model) -> int:
    """The patch size a patch embedding insists the input is a multiple of (0: none does)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "patch_size", None)
    if not size or getattr(patch_embed, "dynamic_img_pad", False):
        return 0
    return size if isinstance(size, int) else max(size)


def crop_failure(model, net, key: str, field: str, size: int, error: BaseException) -> str:
    """Why a crop size fails that the model's own size runs, and what to change."""
    reason = f"data.{field}={size} fails: {first_line(error).rstrip('.')}"
    native = "x".join(map(str, native_image_size(model)))
    fixing = fixed_size_kwargs(net.arch_kwargs or {})
    if fixing and "dynamic_img_size" in model_facts(net.arch, net.arch_kwargs).arguments:
        return (f"{key}.arch_kwargs: {fixing} makes {net.arch} take only {native}-px images ({reason}); remove it "
                f"from {key}.arch_kwargs so that the model follows both crop sizes (dynamic_img_size=True)")
    if is_fixed_size(model):
        return (f"{key}.arch: {net.arch} has a fixed input size ({native} px) and no dynamic_img_size, so it cannot "
                f"take both crop sizes (data.global_crop_size, data.local_crop_size): {reason}; pick a family that "
                "follows the input size (README 'Backbones')")
    patch = patch_size(model)
    if patch and size % patch:
        return (f"data.{field} ({size}) is not a multiple of {key}'s patch size {patch} ({net.arch}): "
                f"pick a multiple, e.g. {max(patch, size // patch * patch)}")
    reduction = feature_reduction(model)
    hint = f", multiples of {reduction}" if reduction and size % reduction else ""
    return (f"data.{field} ({size}) does not run through {key} ({net.arch}): {first_line(error)}; use larger "
            f"crops{hint}, or change the model's size arguments in {key}.arch_kwargs (output_stride, img_size, "
            f"window_size) or {key}.arch")


def fixed_size_kwargs(arch_kwargs: dict) -> str:
    """The user's arch_kwargs that turn off following the input size, as 'name=value' ('' if none)."""
    fixing = {"dynamic_img_size": False, "strict_img_size": True}
    return ", ".join(f"{k}={arch_kwargs[k]}" for k, off in fixing.items()
                     if k in arch_kwargs and bool(arch_kwargs[k]) == off)


def is_fixed_size(model) -> bool:
    """timm's own word: a pretrained config marked fixed_input_size, or a patch embedding that asserts
    the input is exactly its img_size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    strict = getattr(getattr(model, "patch_embed", None), "strict_img_size", False)
    return bool(cfg.get("fixed_input_size") or strict) and not getattr(model, "dynamic_img_size", False)


def feature_reduction(model) -> int:
    info = getattr(model, "feature_info", None)
    try:
        return int(info[-1]["reduction"])
    except (TypeError, KeyError, IndexError):
        return 0


def checked_search_dim(config: Config) -> int:
    try:
        return pair_search_dim(config)
    except ValueError as error:
        raise ConfigError(f"mokd.search_dim: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
