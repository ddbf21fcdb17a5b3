"""What happens to a network's gradients between DeepSpeed's reduction and the optimizer update.

`GradientGate` hooks the engine's torch optimizer (`register_step_pre_hook`), so it runs after
gradient accumulation and the data-parallel reduction, on the exact tensors the update will read:
- ZeRO-0: each parameter's `.grad`, identical on every rank;
- ZeRO-1/2: one flat fp32 gradient partition per parameter group; each parameter's slice of this
  rank's partition is found through DeepSpeed's own fragment map (`param._hp_mapping`), and the
  per-parameter squared norms of the slices are summed over ranks with one all-reduce per group;
- DeepSpeed's non-ZeRO bf16 wrapper: one whole flat fp32 gradient per group;
Per optimizer step it
1. computes every parameter tensor's gradient norm (multi-tensor `_foreach_norm`);
2. refuses a non-finite norm on every rank alike (the norms are the same everywhere): the update is
   skipped and `non_finite` is set for the caller to stop the run;
3. clips per tensor, as DINO and the authors do: a tensor whose gradient norm exceeds `clip` is
   scaled by clip / (norm + 1e-6) (in `global` mode DeepSpeed clips by the global norm instead);
4. while the last layer is frozen, drops its gradients, so the optimizer skips those tensors
   entirely: no SGD momentum, no Adam moments, no weight decay accumulate for them;
5. on a step that asks for it (`begin_step(count_clipped=True)`), counts how many of the watched
   tensors (the backbone's: train.term_gradients_every) it clipped, from the norms it has anyway.
- ZeRO-3: each parameter's shard within the sub-group's fp32 partition, from DeepSpeed's
  sub-group layout; one all-reduce per sub-group.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as torch_dist
from torch import nn

from mokd_scale.engine.zero_layout import zero3_shard_starts
from mokd_scale.runtime import dist
from mokd_scale.runtime.profiling import phase

# Added to the norm before dividing, as DINO's clip_gradients does.
CLIP_EPSILON = 1e-6


class GradientGate:
    def __init__(self, optimizer: torch.optim.Optimizer, group_params: list[list[nn.Parameter]],
                 clip: float, per_tensor: bool, frozen_kind: str, wrapper=None, watched: tuple = ()):
        """optimizer: the torch optimizer inside the engine; group_params: each param group's model
        parameters, in the order the groups were given to DeepSpeed (it keeps non-empty groups in order);
        wrapper: the engine's optimizer (DeepSpeed's ZeRO-3 wrapper knows its sub-groups' layout);
        watched: the parameters whose clipping `clipped_fraction` reports."""
        self.wrapper = wrapper
        self.clip = clip
        self.per_tensor = per_tensor and clip > 0
        self.frozen_kind = frozen_kind
        # By name, not identity: loading an optimizer state replaces the group dicts (keeping their keys).
        self.group_index = {group["name"]: i for i, group in enumerate(optimizer.param_groups)}
        self.group_params = group_params
        self.model_param_ids = {id(p) for params in group_params for p in params}
        watched_ids = {id(p) for p in watched}
        self.watched_slots = [[slot for slot, p in enumerate(params) if id(p) in watched_ids] for params in group_params]
        self.layouts: dict[tuple[str, int], tuple[list[tuple[int, int, int]], bool]] = {}
        self.freeze_last_layer = False
        self.begin_step(freeze_last_layer=False)
        optimizer.register_step_pre_hook(self.before_step)

    def begin_step(self, freeze_last_layer: bool, count_clipped: bool = False) -> None:
        """Reset the per-step record; called before each optimizer step's first micro-batch."""
        self.freeze_last_layer = freeze_last_layer
        self.count_clipped = count_clipped and self.per_tensor
        self.non_finite = False
        self.ran = False
        self.squared_norm = 0.0
        self.clipped = self.watched_count = 0

    @property
    def clipped_fraction(self) -> float | None:
        """Of the watched tensors, the fraction clipped at the last step that counted them (None: not counted,
        or no per-tensor clipping). The norms are the reduced ones, so every rank has the same fraction."""
        return self.clipped / self.watched_count if self.count_clipped and self.watched_count else None

    @property
    def global_norm(self) -> float:
        """L2 norm of all gradients before clipping, of the last step."""
        return math.sqrt(self.squared_norm) if math.isfinite(self.squared_norm) else float("inf")

    @torch.no_grad()
    def before_step(self, optimizer, args, kwargs) -> None:
        with phase("grad_clip"):
            self.ran = True
            for group in optimizer.param_groups:
                self.gate_group(group)

    def gate_group(self, group: dict) -> None:
        grads, slots, partitioned = self.gradient_pieces(group)
        count = len(self.group_params[self.group_index[group["name"]]])
        norms = self.tensor_norms(grads, slots, partitioned, count)
        self.squared_norm += sum(n * n for n in norms)
        if self.non_finite or not all(math.isfinite(n) for n in norms):
            self.non_finite = True
            drop_gradients(group)
            return
        if self.per_tensor:
            clip_pieces(grads, [norms[slot] for slot in slots], self.clip)
        if self.count_clipped:
            watched = self.watched_slots[self.group_index[group["name"]]]
            self.watched_count += len(watched)
            self.clipped += sum(self.clip / (norms[slot] + CLIP_EPSILON) < 1 for slot in watched)
        if self.freeze_last_layer and group.get("kind") == self.frozen_kind:
            drop_gradients(group)

    def gradient_pieces(self, group: dict) -> tuple[list[torch.Tensor], list[int], bool]:
        """The gradient tensors the update will read, and for each the slot of its parameter in the
        group's parameter list; partitioned=True when the pieces are this rank's slices only."""
        params = group["params"]
        if len(params) == 1 and id(params[0]) not in self.model_param_ids:
            return self.partition_slices(group, params[0])
        pieces = [(p.grad, slot) for slot, p in enumerate(params) if p.grad is not None]
        return [g for g, _ in pieces], [s for _, s in pieces], False

    def partition_slices(self, group: dict, flat: torch.Tensor):
        """Views of a flat fp32 gradient, one per parameter piece it holds (see slice_layout)."""
        layout, partitioned = self.slice_layout(group["name"], flat)
        if flat.grad is None:
            return [], [], partitioned
        return [flat.grad.narrow(0, start, numel) for _, start, numel in layout], \
            [slot for slot, _, _ in layout], partitioned

    def slice_layout(self, name: str, flat: torch.Tensor) -> tuple[list[tuple[int, int, int]], bool]:
        """(slot, start, numel) of each parameter piece in a flat fp32 partition, and whether it is one
        rank's partition. ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map each parameter's piece of this
        rank's partition (`_hp_mapping`, None for a parameter held by other ranks); ZeRO-3 shards every
        parameter; DeepSpeed's non-ZeRO bf16/fp16 wrapper keeps the whole group, laid out like the
        parameters' own flat low-precision buffer. Fixed for a run: worked out once per partition."""
        key = (name, id(flat))
        if key not in self.layouts:
            self.layouts[key] = self.find_layout(self.group_index[name], flat)
        return self.layouts[key]

    def find_layout(self, index: int, flat: torch.Tensor) -> tuple[list[tuple[int, int, int]], bool]:
        params = self.group_params[index]
        locations = self.zero3_locations(flat) if hasattr(self.wrapper, "fp32_partitioned_groups_flat") else None
        partitioned = locations is not None or any(hasattr(param, "_hp_mapping") for param in params)
        layout = []
        for slot, param in enumerate(params):
            if locations is not None:
                if id(param) not in locations:
                    continue  # in another sub-group of this group
                start, numel = locations[id(param)]
            elif partitioned:
                mapping = param._hp_mapping
                if mapping is None or mapping.param_group_index != index:
                    continue  # no part of it in this rank's partition
                start, numel = mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel
            else:
                start, numel = param.storage_offset(), param.numel()
            if start + numel > flat.numel():
                raise RuntimeError(f"cannot locate a parameter of shape {tuple(param.shape)} in DeepSpeed's flat "
                                   f"gradient ({flat.numel()} elements): unsupported optimizer wrapper for "
                                   f"per-tensor clipping; set networks.X.clip_mode=global")
            layout.append((slot, start, numel))
        return layout, partitioned

    def zero3_locations(self, flat: torch.Tensor) -> dict[int, tuple[int, int]]:
        """ZeRO-3 shards every parameter over the ranks; a sub-group's fp32 partition is the
        concatenation of its parameters' shards (engine/zero_layout.py)."""
        sub_group = next(i for i, t in enumerate(self.wrapper.fp32_partitioned_groups_flat) if t is flat)
        return zero3_shard_starts(self.wrapper, sub_group)

    @staticmethod
    def tensor_norms(grads: list[torch.Tensor], slots: list[int], partitioned: bool, count: int) -> list[float]:
        """Gradient norm of each of the group's `count` parameters (0 without a gradient), as Python
        floats: one device-to-host copy per group, which is also where the finiteness is read."""
        norms = [0.0] * count
        if not partitioned:
            if grads:
                for slot, norm in zip(slots, torch.stack(torch._foreach_norm(grads)).tolist()):
                    norms[slot] = norm
            return norms
        device = grads[0].device if grads else dist_device()
        squares = torch.zeros(count, dtype=torch.float32, device=device)
        if grads:
            local = torch.stack(torch._foreach_norm(grads)).float()
            squares.index_put_((torch.tensor(slots, device=device),), local * local, accumulate=True)
        if dist.is_dist():
            torch_dist.all_reduce(squares, op=torch_dist.ReduceOp.SUM)
        return squares.sqrt().tolist()


def clip_pieces(grads: list[torch.Tensor], norms: list[float], clip: float) -> None:
    """Scale each gradient whose tensor norm exceeds `clip` by clip / (norm + 1e-6), in one kernel."""
    scaled, factors = [], []
    for grad, norm in zip(grads, norms):
        factor = clip / (norm + CLIP_EPSILON)
        if factor < 1:
            scaled.append(grad)
            factors.append(factor)
    if scaled:
        torch._foreach_mul_(scaled, factors)


def drop_gradients(group: dict) -> None:
    """The optimizer skips tensors without a gradient: no update and no state change for them."""
    for param in group["params"]:
        param.grad = None


def dist_device() -> torch.device:
    """The device collectives run on: the current CUDA device under NCCL, else the CPU."""
    if torch.cuda.is_available() and dist.is_dist() and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
