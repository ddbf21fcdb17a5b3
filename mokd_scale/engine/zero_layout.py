"""Where each parameter's optimizer state lies in a saved ZeRO engine folder, whatever the world size that
wrote it: the reading half of engine/reshard.py, and the ZeRO-3 shard layout of a live engine.

ZeRO-1/2 (SavedPartitions). DeepSpeed writes one `*zero_pp_rank_<r>_mp_rank_00_optim_states.pt` per
rank. Each holds that rank's partition of every parameter group's flat fp32 weights (`single_partition_of_fp32_groups`), the torch
optimizer's state of that flat partition (one tensor per state key: `momentum_buffer` for SGD and LARS,
`exp_avg` / `exp_avg_sq` for AdamW, plus scalars such as AdamW's `step`), and the fragment map
(`param_slice_mappings`: parameter name -> where its piece starts in the partition, and how long it is).
A parameter's pieces on consecutive ranks are consecutive pieces of the parameter, so its whole state
is their concatenation in rank order.

ZeRO-3 (SavedShards). Every parameter is cut into world-size equal shards (the last one padded), and a
rank's partition of a sub-group is its shards of the sub-group's parameters, in order; the order and
shapes are in the model-states files (`param_shapes`, one ordered dict per sub-group), the partitions
(`fp32_flat_groups`) and the optimizer's state of each in the optimizer files.

The files are memory-mapped: a rank reads only the pages of the pieces it asks for, and the ranks of a
node share them through the page cache.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

OPTIM_FILES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"
MODEL_FILE_OF_RANK_0 = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one per rank
RANK_IN_NAME = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00")
FP32 = "fp32"  # the key under which the flat fp32 weights travel beside the optimizer's own keys


class LayoutError(ValueError):
    """A saved engine folder this module cannot read the layout of; the message says why."""


def load_trusted(path: Path) -> dict:
    # DeepSpeed's files are pickles of its own objects (the loss scaler): weights_only=False, trusted files
    # only (train/checkpoint.py says which).
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def saved_partitions(engine_dir: Path):
    """The reader for the ZeRO stage the folder was saved with."""
    zero3 = (Path(engine_dir) / MODEL_FILE_OF_RANK_0).is_file()
    return SavedShards(engine_dir) if zero3 else SavedPartitions(engine_dir)


def partition_files(engine_dir: Path) -> list[Path]:
    """The saved ranks' optimizer files, in rank order; raises when one is missing."""
    files = {int(RANK_IN_NAME.search(path.name).group(1)): path for path in Path(engine_dir).glob(OPTIM_FILES)}
    if not files or sorted(files) != list(range(len(files))):
        raise LayoutError(f"{engine_dir}: ZeRO optimizer files of ranks {sorted(files)} found, expected ranks "
                          f"0..{max(files, default=0)} without gaps")
    return [files[rank] for rank in range(len(files))]


class SavedPartitions:
    """Every saved rank's ZeRO-1/2 optimizer state of one engine (DeepSpeed's rigid or elastic layout)."""

    def __init__(self, engine_dir: Path):
        self.ranks = [load_trusted(path)["optimizer_state_dict"] for path in partition_files(engine_dir)]
        self.engine_dir = engine_dir
        if any("param_slice_mappings" not in rank for rank in self.ranks):
            raise LayoutError(f"{engine_dir}: no fragment map (param_slice_mappings) in the ZeRO files: not a "
                              f"ZeRO-1/2 save of DeepSpeed >= 0.10")

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def group_count(self) -> int:
        return len(self.ranks[0]["single_partition_of_fp32_groups"])

    def names(self, group: int) -> list[str]:
        """The parameters of `group`, in the order of the flat group."""
        return list(dict.fromkeys(name for saved in self.ranks for name in saved["param_slice_mappings"][group]))

    def group_state(self, rank: int, group: int) -> dict:
        """The torch optimizer's state of one rank's flat partition of `group`."""
        base = self.ranks[rank]["base_optimizer_state"]
        if isinstance(base, dict):  # rigid: a torch state_dict, one flat parameter per group, numbered in order
            return base["state"].get(group, {})
        return base[group]  # elastic: one lean state per group

    def is_partitioned(self, rank: int, group: int, value) -> bool:
        """A tensor the size of the rank's partition (with or without the padding DeepSpeed adds at the end)."""
        lean = self.ranks[rank]["single_partition_of_fp32_groups"][group].numel()
        padded = lean + self.ranks[rank]["group_paddings"][group]
        return torch.is_tensor(value) and value.dim() == 1 and value.numel() in (lean, padded)

    def partitioned_keys(self, group: int) -> list[str]:
        """FP32 and every optimizer-state key of `group` held per partition (absent: the group never stepped)."""
        state = self.group_state(0, group)
        return [FP32] + [key for key, value in state.items() if self.is_partitioned(0, group, value)]

    def unpartitioned_state(self, group: int) -> dict:
        """State entries that are the same on every rank (AdamW's step count)."""
        state = self.group_state(0, group)
        return {key: value.clone() if torch.is_tensor(value) else value
                for key, value in state.items() if not self.is_partitioned(0, group, value)}

    def whole(self, group: int, name: str, key: str) -> torch.Tensor:
        """Parameter `name`'s whole flat `key` tensor (FP32: its fp32 weights), joined from the saved ranks."""
        pieces = []
        for rank, saved in enumerate(self.ranks):
            address = saved["param_slice_mappings"][group].get(name)
            if address is None:
                continue  # no piece of it on this rank
            source = saved["single_partition_of_fp32_groups"][group] if key == FP32 \
                else self.group_state(rank, group)[key]
            pieces.append(source.narrow(0, address.start, address.numel))
        if not pieces:
            raise LayoutError(f"{self.engine_dir}: parameter {name!r} of group {group} is in none of the "
                              f"{self.world_size} saved partitions: saved by another model")
        return torch.cat(pieces)


class SavedShards(SavedPartitions):
    """Every saved rank's ZeRO-3 optimizer state of one engine; the same questions as SavedPartitions."""

    def __init__(self, engine_dir: Path):
        self.engine_dir = engine_dir
        self.ranks = [load_trusted(path)["optimizer_state_dict"] for path in partition_files(engine_dir)]
        shapes = load_trusted(Path(engine_dir) / MODEL_FILE_OF_RANK_0)["param_shapes"]
        # Per sub-group: name -> (start of its shard in every rank's partition, shard size, whole size).
        self.places: list[dict[str, tuple[int, int, int]]] = []
        for group_shapes in shapes:
            start, places = 0, {}
            for name, shape in group_shapes.items():
                numel = shape.numel()
                shard = -(-numel // self.world_size)
                places[name], start = (start, shard, numel), start + shard
            self.places.append(places)
        if len(self.places) != self.group_count:
            raise LayoutError(f"{engine_dir}: {len(self.places)} parameter sub-groups in param_shapes, "
                              f"{self.group_count} in the optimizer files")

    @property
    def group_count(self) -> int:
        return len(self.ranks[0]["fp32_flat_groups"])

    def names(self, group: int) -> list[str]:
        return list(self.places[group])

    def group_state(self, rank: int, group: int) -> dict:
        return self.ranks[rank]["optimizer_state_dict"]["state"].get(group, {})

    def is_partitioned(self, rank: int, group: int, value) -> bool:
        size = self.ranks[rank]["fp32_flat_groups"][group].numel()
        return torch.is_tensor(value) and value.dim() == 1 and value.numel() == size

    def whole(self, group: int, name: str, key: str) -> torch.Tensor:
        if name not in self.places[group]:
            raise LayoutError(f"{self.engine_dir}: parameter {name!r} is not in sub-group {group}: saved by "
                              f"another model")
        start, shard, numel = self.places[group][name]
        pieces = [(saved["fp32_flat_groups"][group] if key == FP32 else self.group_state(rank, group)[key])
                  .narrow(0, start, shard) for rank, saved in enumerate(self.ranks)]
        return torch.cat(pieces)[:numel]


def zero3_shard_starts(wrapper, sub_group: int) -> dict[int, tuple[int, int]]:
    """id(param) -> (start, numel) of this rank's shard of it in a live ZeRO-3 sub-group's partition, laid out
    like the low-precision shards' buffer (DeepSpeed's ZeRO-3 optimizer `wrapper`)."""
    low_precision = wrapper.fp16_partitioned_groups_flat[sub_group]
    size = low_precision.element_size()
    return {id(param): ((param.ds_tensor.data_ptr() - low_precision.data_ptr()) // size, param.ds_tensor.numel())
            for param in wrapper.fp16_groups[sub_group]}
