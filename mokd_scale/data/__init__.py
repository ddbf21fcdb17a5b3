"""Data pipeline: shard lists, resampled WebDataset-style streaming, fast DINO multi-crop, eval loader.

This is the read path of training and evaluation; writing shards is mokd_scale.shards.
Public API: build_train_loader, build_eval_loader, normalize_crops.
The names load on first use, so that importing one light module (shard_spec, seeds) does not
import torch and torchvision.
"""
import importlib

_PUBLIC = {
    "build_train_loader": "train_loader",
    "build_eval_loader": "eval_loader",
    "normalize_crops": "multicrop",
    "MultiCrop": "multicrop",
    "crop_recipes": "multicrop",
    "resolve_shards": "shard_spec",
    "ShardList": "shard_spec",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
