"""Data pipeline: shard lists, resampled WebDataset-style streaming, fast DINO multi-crop, eval loader.

Public API: build_train_loader, build_eval_loader, normalize_crops.
"""
from mokd_scale.data.eval_loader import build_eval_loader
from mokd_scale.data.multicrop import MultiCrop, crop_recipes, normalize_crops
from mokd_scale.data.shard_spec import ShardList, resolve_shards
from mokd_scale.data.train_loader import build_train_loader

__all__ = ["build_train_loader", "build_eval_loader", "normalize_crops", "MultiCrop", "crop_recipes",
           "resolve_shards", "ShardList"]
