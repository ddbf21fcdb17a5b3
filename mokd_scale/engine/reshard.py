"""A ZeRO-1/2 engine's fp32 weights and optimizer state, saved by one number of ranks, loaded onto another.

DeepSpeed refuses ZeRO optimizer files of another data-parallel size, and its universal checkpoint
carries Adam's two moments only (its ds_to_universal maps `fp32`, `exp_avg`, `exp_avg_sq`), so SGD and
LARS would lose their momentum. Here every state key the optimizer holds (momentum_buffer, exp_avg,
exp_avg_sq, ...) is cut to this rank's new partition through DeepSpeed's fragment map on both sides:
the saved ranks' `param_slice_mappings` (engine/zero_layout.py) give each parameter's whole state, and
this rank's `param._hp_mapping` (the map the gradient gate reads too: engine/gradients.py) says which
piece of it this rank's partition holds, and where.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mokd_scale.engine.zero_layout import FP32, LayoutError, SavedPartitions


@torch.no_grad()
def load_resharded(zero_optimizer, engine_dir: Path) -> int:
    """Fill this rank's fp32 partitions and optimizer state of DeepSpeed's ZeRO-1/2 optimizer from the
    partitions saved in engine_dir, then its module weights from those fp32 weights (a collective).
    Returns the saved world size."""
    saved = SavedPartitions(engine_dir)
    groups = zero_optimizer.optimizer.param_groups
    if saved.group_count != len(groups):
        raise LayoutError(f"{engine_dir}: {saved.group_count} parameter groups saved, this network has "
                          f"{len(groups)}: saved by another recipe")
    for index in range(len(groups)):
        load_group(zero_optimizer, saved, index)
    zero_optimizer.update_lp_params()  # the module's weights from the fp32 master weights, all-gathered
    return saved.world_size


def load_group(zero_optimizer, saved: SavedPartitions, index: int) -> None:
    """One parameter group: every partitioned key, parameter by parameter (one whole tensor in memory at once)."""
    flat = zero_optimizer.single_partition_of_fp32_groups[index]
    state = zero_optimizer.optimizer.state[flat]
    state.update(saved.unpartitioned_state(index))
    targets = {FP32: flat.data}
    for key in saved.partitioned_keys(index)[1:]:
        state[key] = torch.zeros_like(flat)  # the tail past the last parameter is padding, zero as DeepSpeed's
        targets[key] = state[key]
    for param in zero_optimizer.bit16_groups[index]:
        mapping = param._hp_mapping
        if mapping is None:
            continue  # held by other ranks only
        name = zero_optimizer.param_names[param]
        kept, there = mapping.lp_fragment_address, mapping.hp_fragment_address
        for key, target in targets.items():
            piece = saved.whole(index, name, key).narrow(0, kept.start, kept.numel)
            target.narrow(0, there.start, there.numel).copy_(piece)
