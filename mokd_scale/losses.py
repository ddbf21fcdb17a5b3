"""MOKD's loss functions: DINO cross-entropy over view pairs, the search-target variant,
centres reduced over the global batch, and the teacher-temperature warm-up.

Every softmax over the K prototypes runs in fp32, whatever dtype the network computed in:
with K = 65536 a bf16 softmax loses most of the teacher's distribution to rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temperature: float):
    """Mean over the batch of -sum_k p_teacher(k) log p_student(k)."""
    log_probs = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(teacher_probs * log_probs).sum(dim=-1).mean()


def teacher_probabilities(teacher_logits: torch.Tensor, teacher_temperature: float,
                          center: torch.Tensor | None = None) -> torch.Tensor:
    logits = teacher_logits.detach().float()
    if center is not None:
        logits = logits - center.float()
    # Written out rather than F.softmax: torch's fp32 CPU softmax uses a fast exp whose
    # ~1e-6 relative error shows in the loss; exp + sum here is exact to ~1e-8 (and as fast on GPU).
    scaled = logits / teacher_temperature
    weights = torch.exp(scaled - scaled.amax(dim=-1, keepdim=True))
    return weights / weights.sum(dim=-1, keepdim=True)


def dino_cross_entropy(student_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor],
                       teacher_temperature: float, student_temperature: float,
                       center: torch.Tensor | None = None) -> torch.Tensor:
    """Average over all (teacher view i, student view v) pairs with v != i.

    Teacher views are the 2 global crops, student views are all crops in the same order
    (globals first), so v == i is the very same crop: that pair is skipped. The teacher side
    is detached and centred (teacher logits minus `center`) before its sharpened softmax.
    """
    if len(teacher_logits) > len(student_logits):
        raise ValueError(f"{len(teacher_logits)} teacher views but only {len(student_logits)} student views: "
                         "the student must see every global crop the teacher sees, first")
    total, pairs = 0.0, 0
    for i, teacher in enumerate(teacher_logits):
        probs = teacher_probabilities(teacher, teacher_temperature, center)
        for v, student in enumerate(student_logits):
            if v == i:
                continue
            total = total + cross_entropy(probs, student, student_temperature)
            pairs += 1
    if pairs == 0:
        raise ValueError("no (teacher view, student view) pair with different crops: pass at least 2 views")
    return total / pairs


def paired_cross_entropy(student_logits: Sequence[torch.Tensor], target_logits: Sequence[torch.Tensor],
                         teacher_temperature: float, student_temperature: float) -> torch.Tensor:
    """Search-loss variant: student view v against its own target v only, no centre, mean over v."""
    if len(student_logits) != len(target_logits) or not student_logits:
        raise ValueError(f"{len(student_logits)} student views vs {len(target_logits)} targets: "
                         "need one target per student view")
    total = 0.0
    for student, target in zip(student_logits, target_logits):
        total = total + cross_entropy(teacher_probabilities(target, teacher_temperature), student,
                                      student_temperature)
    return total / len(student_logits)


class Centers(nn.Module):
    """One network's centres for its teacher's projection and search logits, shape (1, K).

    accumulate() once per micro-batch, update() once per optimizer step: one all-reduce of
    [sum of projection logits, sum of search logits, count] over every global view of every
    sample on every rank, so the centre is the same whatever the number of ranks.
    The centres are buffers and go into checkpoints with state_dict(); the running sums are
    not persistent (they are empty between optimizer steps).
    """

    def __init__(self, out_dim: int, momentum: float):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("proj", torch.zeros(1, out_dim))
        self.register_buffer("search", torch.zeros(1, out_dim))
        # float64 sums: their value must not depend on how the batch is split over ranks.
        self.register_buffer("proj_sum", torch.zeros(out_dim, dtype=torch.float64), persistent=False)
        self.register_buffer("search_sum", torch.zeros(out_dim, dtype=torch.float64), persistent=False)
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def accumulate(self, teacher_proj_logits, teacher_search_logits) -> None:
        """Add this micro-batch's teacher logits (tensors (n, K) or lists of them, one per view)."""
        proj = stack_views(teacher_proj_logits)
        search = stack_views(teacher_search_logits)
        if proj.shape != search.shape or proj.shape[-1] != self.proj.shape[-1]:
            raise ValueError(f"teacher logits {tuple(proj.shape)} / {tuple(search.shape)} do not match "
                             f"each other or K={self.proj.shape[-1]}")
        self.proj_sum += proj.double().sum(dim=0)
        self.search_sum += search.double().sum(dim=0)
        self.count += proj.shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """c <- m*c + (1-m)*mean over the global batch. A collective: call on every rank."""
        packed = torch.cat([self.proj_sum, self.search_sum, self.count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        out_dim = self.proj.shape[-1]
        count = packed[-1]
        if count <= 0:
            raise RuntimeError("Centers.update() without accumulate() since the last update on any rank")
        for center, total in ((self.proj, packed[:out_dim]), (self.search, packed[out_dim:2 * out_dim])):
            mean = (total / count).to(center.dtype).unsqueeze(0)
            center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)
        self.proj_sum.zero_()
        self.search_sum.zero_()
        self.count.zero_()


def stack_views(logits) -> torch.Tensor:
    if isinstance(logits, torch.Tensor):
        return logits.detach().reshape(-1, logits.shape[-1]).float()
    return torch.cat([view.detach().float() for view in logits])
