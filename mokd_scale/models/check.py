"""Model-level checks of a recipe, before any process group or weight exists.

Both networks are built on the meta device (shapes only), so the mistakes that would otherwise end
a launched job in a timm traceback are reported at once, as a ConfigError naming the key to change:
an unknown architecture, arch_kwargs that belong to another architecture, a ViT that is not pooled
by its class token, crops that do not fit a ViT's patches or leave a CNN no feature map, a pair
without a shared search width.
"""
from __future__ import annotations

import torch

from mokd_scale.config import Config, ConfigError
from mokd_scale.models.backbone import create_timm_model, is_vit_arch, token_grid
from mokd_scale.models.network import build_network, pair_search_dim
from timm.models import is_model


def check_networks(config: Config) -> None:
    for name in config.networks:
        check_backbone(config, name)
    check_term_weights(config)
    search_dim = checked_search_dim(config)
    for name in config.networks:
        try:
            with torch.device("meta"):
                build_network(config, name, search_dim=search_dim)
        except (TypeError, ValueError, RuntimeError) as error:
            raise ConfigError(f"networks.{name} cannot be built with this recipe: {first_line(error)}") from None


def check_term_weights(config: Config) -> None:
    """A term that is on needs what it reads: KoLeo, the micro-batch's nearest neighbours (2 samples or more)."""
    from mokd_scale.method.objective import term_weights
    if "koleo" in term_weights(config) and config.train.micro_batch_size < 2:
        raise ConfigError("mokd.term_weights.koleo > 0 needs train.micro_batch_size >= 2 (KoLeo compares the "
                          "samples of a micro-batch)")


def check_backbone(config: Config, name: str) -> None:
    net, key = config.networks[name], f"networks.{name}"
    if not is_model(net.arch):
        raise ConfigError(f"{key}.arch: unknown timm architecture {net.arch!r}; use a name from "
                          f"timm.list_models(), e.g. vit_small_patch16_224 or resnet50")
    try:
        with torch.device("meta"):
            model = create_timm_model(net.arch, net.arch_kwargs, 0.0)
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        raise ConfigError(f"{key}.arch_kwargs {net.arch_kwargs} do not fit {net.arch}: {first_line(error)}; "
                          f"set arguments of this architecture (--set {key}.arch_kwargs={{}} for its defaults)"
                          ) from None
    if is_vit_arch(net.arch):
        check_vit(model, config, key)
    else:
        check_cnn(net, config, key)


def check_vit(model, config: Config, key: str) -> None:
    if getattr(model, "global_pool", None) != "token":
        raise ConfigError(f"{key}.arch_kwargs: MOKD needs a ViT pooled by its class token "
                          f"(global_pool='token', class_token=True), got global_pool={model.global_pool!r}")
    patch = model.patch_embed.patch_size[0]
    for field in ("global_crop_size", "local_crop_size"):
        size = getattr(config.data, field)
        if size % patch:
            raise ConfigError(f"data.{field} ({size}) is not a multiple of {key}'s patch size {patch}: "
                              f"pick a multiple, e.g. {max(patch, size // patch * patch)}")


def check_cnn(net, config: Config, key: str) -> None:
    for field in ("global_crop_size", "local_crop_size"):
        size = getattr(config.data, field)
        try:
            grid = token_grid(net.arch, net.arch_kwargs, size)
        except RuntimeError as error:
            raise ConfigError(f"data.{field} ({size}) is too small for {key} ({net.arch}): {first_line(error)}; "
                              f"use larger crops or a smaller output stride ({key}.arch_kwargs)") from None
        if min(grid) < 1:
            raise ConfigError(f"data.{field} ({size}) leaves {key} ({net.arch}) no feature map; use larger "
                              f"crops or a smaller output stride ({key}.arch_kwargs)")


def checked_search_dim(config: Config) -> int:
    try:
        return pair_search_dim(config)
    except ValueError as error:
        raise ConfigError(f"mokd.search_dim: {first_line(error)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
