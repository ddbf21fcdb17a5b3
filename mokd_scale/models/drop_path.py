"""Stochastic depth whose rate is a tensor, for compiled blocks.

timm's DropPath keeps its rate as a Python float, and torch.compile specialises a block's graph
on every float it reads: ViT-L's 24 blocks have 24 rates (drop_path_rate spread linearly over
depth), so one compiled block frame recompiled once per block and per crop size, which made most
of the first step's compile time. Here the keep probability is a 0-dim fp32 tensor, an input of
the graph rather than a constant, and every block shares one graph per input shape.

The tensor is a plain attribute, not a buffer: it is not in the state_dict (checkpoints, the
teacher's copy of the student's buffers and exported backbones are unchanged) and the bf16 cast of
a student's buffers does not round it. It follows the module's device (`_apply`): inductor would
copy a CPU scalar to the GPU in every call of the graph, and wait for the copy.

Same law as timm's (each sample's residual branch kept with probability 1 - rate and scaled by
1 / (1 - rate)), not the same draws: the mask comes from torch.rand, timm's from bernoulli_.
Only train.compile swaps it in (models/compile.py), so eager runs keep timm's draws.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import DropPath


class TensorRateDropPath(nn.Module):
    def __init__(self, drop_prob: float, scale_by_keep: bool = True):
        super().__init__()
        keep = 1.0 - drop_prob
        self.keep_prob = torch.tensor(keep, dtype=torch.float32)
        self.scale = torch.tensor(1.0 / keep if scale_by_keep and keep > 0.0 else 1.0, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one draw per sample
        kept = torch.rand(shape, device=x.device) < self.keep_prob
        return x * (kept * self.scale).to(x.dtype)

    def _apply(self, fn, recurse=True):
        """Move the rate with the module (.to(device), .cuda(), DeepSpeed's placement), never cast it."""
        module = super()._apply(fn, recurse)
        device = fn(torch.zeros(())).device
        self.keep_prob, self.scale = self.keep_prob.to(device), self.scale.to(device)
        return module

    def extra_repr(self) -> str:
        return f"drop_prob={1.0 - float(self.keep_prob):.3f}"


def tensor_rate_drop_paths(model: nn.Module) -> int:
    """Replace every timm DropPath of `model` in place; returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is DropPath:
                setattr(parent, name, TensorRateDropPath(child.drop_prob, child.scale_by_keep))
                replaced += 1
    return replaced
