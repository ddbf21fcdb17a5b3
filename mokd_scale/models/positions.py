"""Learned position embeddings on a token grid, resized to another grid as DINO and the MOKD
authors resize them: bicubic interpolation by scale factor (target + 0.1) / base per axis,
without antialiasing, so that the floor of base * factor is the target size.

Resizing *by factor* is not resizing *to a size*: the sampling positions differ (src = (dst + 0.5) /
factor - 0.5), and timm's own resize (to a size, antialiased) gives other embeddings for a local crop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# A little over the target size, so that the floor of base * factor is the target.
RESIZE_MARGIN = 0.1


def resize_position_grid(positions: torch.Tensor, base: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """positions (1, base_h * base_w, D) on a row-major grid -> (1, target_h * target_w, D)."""
    base, target = tuple(base), tuple(target)
    if target == base:
        return positions
    dim = positions.shape[-1]
    square = positions.reshape(1, *base, dim).permute(0, 3, 1, 2)
    factors = ((target[0] + RESIZE_MARGIN) / base[0], (target[1] + RESIZE_MARGIN) / base[1])
    # bicubic is not implemented for bf16 on every backend: resize in fp32 (or float64).
    compute = square if square.dtype in (torch.float32, torch.float64) else square.float()
    resized = F.interpolate(compute, scale_factor=factors, mode="bicubic", align_corners=False)
    if tuple(resized.shape[-2:]) != target:
        raise RuntimeError(f"resizing the {base} position grid by {factors} gave {tuple(resized.shape[-2:])}, "
                           f"not {target}")
    return resized.permute(0, 2, 3, 1).reshape(1, -1, dim).to(positions.dtype)
