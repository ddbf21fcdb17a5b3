"""The teacher's exponential moving average of its student: θ_t ← m·θ_t + (1 − m)·θ_s, in fp32.

Done with as few kernels as the student's layout allows, because at ViT-L size a per-tensor
loop is ~900 small launches per step:
- A bf16 student under ZeRO-1/2 lives in a few flat buffers (DeepSpeed's low-precision
  groups). The teacher's parameters are made views into fp32 buffers of the same layout,
  so one update is two kernels per buffer (scale, then add the bf16 buffer with promotion).
- Parameters with storage of their own (ZeRO-0, frozen weight-norm scales) are updated by
  multi-tensor `_foreach_` kernels.
- Under ZeRO-3 each rank holds a shard: parameters are gathered per part, then updated.
All paths compute the same values (equal to the plain per-tensor update to fp32 rounding).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


class TeacherEMA:
    def __init__(self, teacher: nn.Module, student: nn.Module, zero_stage: int):
        self.teacher = teacher
        self.student = student
        self.zero_stage = zero_stage
        teacher_params = dict(teacher.named_parameters())
        self.pairs = [(teacher_params[name], param) for name, param in student.named_parameters()]
        self.flats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.singles: list[tuple[torch.Tensor, torch.Tensor]] = self.pairs
        if zero_stage in (1, 2):
            self.flats, self.singles = share_flat_layout(self.pairs)

    @torch.no_grad()
    def update(self, momentum: float) -> None:
        if self.zero_stage == 3:
            self.update_gathered(momentum)
            return
        if self.flats_moved():  # DeepSpeed re-allocated its buffers (e.g. on load): adopt the new layout
            self.flats, self.singles = share_flat_layout(self.pairs)
        for teacher_flat, student_flat, _, _ in self.flats:
            teacher_flat.mul_(momentum).add_(student_flat, alpha=1.0 - momentum)
        update_tensors([t for t, _ in self.singles], [s for _, s in self.singles], momentum)

    def flats_moved(self) -> bool:
        return any(anchor.data_ptr() != pointer for _, _, anchor, pointer in self.flats)

    def update_gathered(self, momentum: float) -> None:
        """Under ZeRO-3: one gather per part (backbone, heads) rather than one collective per tensor."""
        import deepspeed
        teacher_params = dict(self.teacher.named_parameters())
        for child_name, child in self.student.named_children():
            named = list(child.named_parameters())
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                update_tensors([teacher_params[f"{child_name}.{n}"] for n, _ in named], [p for _, p in named],
                               momentum)


def update_tensors(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    if not teacher:
        return
    same_dtype = defaultdict(lambda: ([], []))
    for t, s in zip(teacher, student):
        same_dtype[s.dtype][0].append(t)
        same_dtype[s.dtype][1].append(s)  # read under no_grad: no detached view per tensor needed
    for dtype, (targets, sources) in same_dtype.items():
        if dtype == targets[0].dtype:
            torch._foreach_lerp_(targets, sources, 1.0 - momentum)
        else:  # lerp needs one dtype; add promotes the bf16 source in place, without a copy
            torch._foreach_mul_(targets, momentum)
            torch._foreach_add_(targets, sources, alpha=1.0 - momentum)


def share_flat_layout(pairs):
    """Student parameters that are views of one flat buffer (DeepSpeed's ZeRO-1/2 groups) get teacher
    parameters that are views, at the same offsets, of an fp32 buffer of the same size.
    Returns [(teacher_flat, student_flat, anchor_param, anchor_data_ptr)] and the remaining pairs."""
    by_storage = defaultdict(list)
    for teacher_param, student_param in pairs:
        by_storage[student_param.untyped_storage().data_ptr()].append((teacher_param, student_param))
    flats, singles = [], []
    for members in by_storage.values():
        if len(members) < 2:
            singles.extend(members)
            continue
        anchor = members[0][1]
        student_flat = anchor.new_empty(0).set_(anchor.untyped_storage())
        teacher_flat = torch.zeros(student_flat.numel(), dtype=torch.float32, device=anchor.device)
        for teacher_param, student_param in members:
            offset = student_param.storage_offset()
            view = teacher_flat[offset:offset + student_param.numel()].view_as(teacher_param)
            view.copy_(teacher_param.detach())
            teacher_param.data = view
        flats.append((teacher_flat, student_flat, anchor, anchor.data_ptr()))
    return flats, singles
