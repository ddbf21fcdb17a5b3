"""MOKD's loss functions: DINO cross-entropy over view pairs, the search-target variant, and
centres reduced over the global batch.

Every softmax over the K prototypes runs in fp32, whatever dtype the network computed in:
with K = 65536 a bf16 softmax loses most of the teacher's distribution to rounding.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def as_views(logits) -> torch.Tensor:
    """(views, batch, K) fp32 from a tensor of that shape or a sequence of (batch, K) views."""
    if isinstance(logits, torch.Tensor):
        if logits.ndim != 3:
            raise ValueError(f"expected logits shaped (views, batch, K), got {tuple(logits.shape)}")
        return logits.float()
    return torch.stack([view.float() for view in logits])


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


def dino_cross_entropy(student_logits, teacher_logits, teacher_temperature: float, student_temperature: float,
                       center: torch.Tensor | None = None) -> torch.Tensor:
    """Average over all (teacher view i, student view v) pairs with v != i of the batch-mean
    cross-entropy -sum_k p_i(k) log q_v(k).

    Teacher views are the 2 global crops, student views are all crops in the same order
    (globals first), so v == i is the very same crop: that pair is skipped. The teacher side
    is detached and centred (teacher logits minus `center`) before its sharpened softmax.
    Logits: (views, batch, K) tensors or sequences of (batch, K) views.

    Vectorised: one softmax over all teacher views, one log-softmax over all student views, and
    the pair sum as (sum over teacher views of p) against every student view, minus the v == i
    pairs. Elementwise products and sums, not a matmul, so TF32 cannot round it.
    """
    student, teacher = as_views(student_logits), as_views(teacher_logits)
    num_teacher, num_student, batch = teacher.shape[0], student.shape[0], student.shape[1]
    if num_teacher > num_student:
        raise ValueError(f"{num_teacher} teacher views but only {num_student} student views: "
                         "the student must see every global crop the teacher sees, first")
    pairs = num_teacher * num_student - num_teacher
    if pairs == 0:
        raise ValueError("no (teacher view, student view) pair with different crops: pass at least 2 views")
    probs = teacher_probabilities(teacher, teacher_temperature, center)
    log_probs = F.log_softmax(student / student_temperature, dim=-1)
    every_pair = (probs.sum(dim=0) * log_probs).sum()
    same_crop = (probs * log_probs[:num_teacher]).sum()
    return -(every_pair - same_crop) / (pairs * batch)


def paired_cross_entropy(student_logits, target_logits, teacher_temperature: float,
                         student_temperature: float) -> torch.Tensor:
    """Search-loss variant: student view v against its own target v only, no centre, mean over
    views and batch. Logits as in dino_cross_entropy."""
    student, target = as_views(student_logits), as_views(target_logits)
    if student.shape != target.shape:
        raise ValueError(f"student views {tuple(student.shape)} vs targets {tuple(target.shape)}: "
                         "need one target per student view")
    probs = teacher_probabilities(target, teacher_temperature)
    log_probs = F.log_softmax(student / student_temperature, dim=-1)
    return -(probs * log_probs).sum(dim=-1).mean()


class Centers(nn.Module):
    """One network's centres for its teacher's projection and (in MOKD mode) search logits, (1, K).

    accumulate() once per micro-batch, update() once per optimizer step: one all-reduce of
    [sum of projection logits, sum of search logits, count] over every global view of every
    sample on every rank, so the centre is the same whatever the number of ranks.
    The centres are buffers and go into checkpoints with state_dict(); the running sums are
    not persistent (they are empty between optimizer steps).
    """

    def __init__(self, out_dim: int, momentum: float, with_search: bool = True):
        super().__init__()
        self.momentum = momentum
        self.heads = ("proj", "search") if with_search else ("proj",)
        for head in self.heads:
            self.register_buffer(head, torch.zeros(1, out_dim))
        # float64 sums: their value must not depend on how the batch is split over ranks.
        self.register_buffer("sums", torch.zeros(len(self.heads), out_dim, dtype=torch.float64), persistent=False)
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64), persistent=False)

    @torch.no_grad()
    def accumulate(self, teacher_proj_logits, teacher_search_logits=None) -> None:
        """Add this micro-batch's teacher logits: tensors (..., K) or sequences of (n, K) views."""
        given = (teacher_proj_logits, teacher_search_logits)[:len(self.heads)]
        views = [stack_views(logits) for logits in given]
        if any(v.shape != views[0].shape for v in views) or views[0].shape[-1] != self.sums.shape[-1]:
            raise ValueError(f"teacher logits {[tuple(v.shape) for v in views]} do not match "
                             f"each other or K={self.sums.shape[-1]}")
        self.sums += torch.stack([v.sum(dim=0, dtype=torch.float64) for v in views])
        self.count += views[0].shape[0]

    @torch.no_grad()
    def update(self) -> None:
        """c <- m*c + (1-m)*mean over the global batch. A collective: call on every rank."""
        packed = torch.cat([self.sums.flatten(), self.count])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
        count = packed[-1]
        if count <= 0:
            raise RuntimeError("Centers.update() without accumulate() since the last update on any rank")
        means = (packed[:-1] / count).view_as(self.sums)
        for head, mean in zip(self.heads, means):
            center = getattr(self, head)
            center.mul_(self.momentum).add_(mean.to(center.dtype).unsqueeze(0), alpha=1.0 - self.momentum)
        self.sums.zero_()
        self.count.zero_()


def stack_views(logits) -> torch.Tensor:
    """(n, K) fp32 rows from a tensor (..., K) or a sequence of (n_i, K) views."""
    if isinstance(logits, torch.Tensor):
        return logits.detach().reshape(-1, logits.shape[-1]).float()
    return torch.cat([view.detach().float() for view in logits])
