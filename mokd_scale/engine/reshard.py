"""A ZeRO engine's fp32 weights and optimizer state, saved by one number of ranks, loaded onto another.

DeepSpeed refuses ZeRO optimizer files of another data-parallel size, and its universal checkpoint
carries Adam's two moments only (its ds_to_universal maps `fp32`, `exp_avg`, `exp_avg_sq`), so SGD and
LARS would lose their momentum. Here every state key the optimizer holds (momentum_buffer, exp_avg,
exp_avg_sq, ...) is cut to this rank's new partition through DeepSpeed's fragment map on both sides:
the saved ranks' `param_slice_mappings` (engine/zero_layout.py) give each parameter's whole state, and
this rank's `param._hp_mapping` (the map the gradient gate reads too: engine/gradients.py) says which
piece of it this rank's partition holds, and where. ZeRO-3 cuts every parameter into equal shards, so
the saved shards join into the whole parameter and this rank takes its shard of the new cut.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as torch_dist

from mokd_scale.engine.zero_layout import FP32, LayoutError, SavedPartitions, saved_partitions, zero3_shard_starts


@torch.no_grad()
def load_resharded(zero_optimizer, engine_dir: Path) -> int:
    """Fill this rank's fp32 partitions and optimizer state of DeepSpeed's ZeRO optimizer from the partitions
    saved in engine_dir; at ZeRO-1/2 then the module's weights from those fp32 weights (a collective; at
    ZeRO-3 the caller loads the module's weights). Returns the saved world size."""
    saved = saved_partitions(engine_dir)
    zero3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat")
    flats = zero_optimizer.fp32_partitioned_groups_flat if zero3 else zero_optimizer.single_partition_of_fp32_groups
    if saved.group_count != len(flats):
        raise LayoutError(f"{engine_dir}: {saved.group_count} parameter groups saved, this network has "
                          f"{len(flats)}: saved by another recipe")
    for index, flat in enumerate(flats):
        pieces = shard_pieces(zero_optimizer, index) if zero3 else fragment_pieces(zero_optimizer, index)
        load_group(saved, index, flat, zero_optimizer.optimizer.state[flat], pieces)
    if not zero3:
        zero_optimizer.update_lp_params()  # the module's weights from the fp32 master weights, all-gathered
    return saved.world_size


def load_group(saved: SavedPartitions, index: int, flat: torch.Tensor, state: dict, pieces) -> None:
    """One parameter group: every partitioned key, parameter by parameter (one whole tensor in memory at once).
    pieces: (name, start in the whole parameter, start in this rank's partition, numel) of what it holds."""
    state.update(saved.unpartitioned_state(index))
    targets = {FP32: flat.data}
    for key in saved.partitioned_keys(index)[1:]:
        state[key] = torch.zeros_like(flat)  # the tail past the last parameter is padding, zero as DeepSpeed's
        targets[key] = state[key]
    for name, kept, there, numel in pieces:
        for key, target in targets.items():
            whole = saved.whole(index, name, key)
            held = min(numel, whole.numel() - kept)  # less on the last ZeRO-3 rank, whose shard ends in padding
            if held > 0:
                target.narrow(0, there, held).copy_(whole.narrow(0, kept, held))


def fragment_pieces(zero_optimizer, index: int):
    """ZeRO-1/2: this rank's fragment of each parameter of group `index`, from DeepSpeed's fragment map."""
    for param in zero_optimizer.bit16_groups[index]:
        mapping = param._hp_mapping
        if mapping is not None:  # None: held by other ranks only
            yield (zero_optimizer.param_names[param], mapping.lp_fragment_address.start,
                   mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)


def shard_pieces(zero_optimizer, index: int):
    """ZeRO-3: this rank's shard of each parameter of sub-group `index` (the last rank's ends in padding)."""
    rank = torch_dist.get_rank(group=zero_optimizer.dp_process_group)
    starts = zero3_shard_starts(zero_optimizer, index)
    for param in zero_optimizer.fp16_groups[index]:
        start, numel = starts[id(param)]
        yield zero_optimizer.param_names[param], rank * numel, start, numel
