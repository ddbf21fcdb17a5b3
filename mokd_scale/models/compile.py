"""Regional torch.compile of a MokdNetwork: each transformer or residual block of the backbone,
the projection head and the search head (its forward: blocks, pooling, last layer).

Compiling regions rather than the whole network keeps what the step relies on working: the
global and local crops (a few input shapes per region), gradient checkpointing (timm
checkpoints block by block, so each checkpointed region is one compiled graph), and the
cross-search calls of the search head with a query token. `nn.Module.compile` compiles in
place, so parameter names and state_dict keys (checkpoints, EMA, export) do not change.

Shapes are static (`dynamic=False`): a block sees only a handful of them (global and local
crops, teacher and student, with and without a query token), and static kernels are the fast
ones. Blocks of one class share one compiled frame, so ResNet-152's bottlenecks (4 stages,
with and without a downsample, grad and no-grad) need more recompilations than torch's
default limit of 8 per frame: the limit is raised, once, to RECOMPILE_LIMIT. Stochastic depth
is swapped for a version whose rate is a tensor (models/drop_path.py): with timm's float rate,
a ViT's blocks (one rate each) recompiled once per block and crop size.
"""
from __future__ import annotations

import torch
from torch import nn

from mokd_scale.models.drop_path import tensor_rate_drop_paths

RECOMPILE_LIMIT = 64


def compile_regions(network: nn.Module, **options) -> list[nn.Module]:
    """Compile the blocks and heads of `network` (a MokdNetwork) in place; `options` go to
    torch.compile (default dynamic=False). Returns the compiled modules."""
    options.setdefault("dynamic", False)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    tensor_rate_drop_paths(network)
    regions = [*backbone_blocks(network.backbone), network.projection_head]
    if network.search_head is not None:  # none in DINO-only (independent) mode
        regions.append(network.search_head)
    for module in regions:
        module.compile(**options)
    return regions


def backbone_blocks(backbone: nn.Module) -> list[nn.Module]:
    """Token model (ViT, DeiT, EVA): its transformer `blocks`. ResNet family (timm `layer1`..`layer4`):
    its residual blocks. Other families are not split into regions (yet)."""
    model = backbone.model
    blocks = getattr(model, "blocks", None)
    if backbone.is_token_model and isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        return list(blocks)
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(stage, nn.Sequential) for stage in stages):
        return [block for stage in stages for block in stage]
    raise ValueError(f"train.compile knows the transformer blocks of token models and ResNet stages (layer1..layer4), "
                     f"not {backbone.arch}: set train.compile=false for this architecture")
