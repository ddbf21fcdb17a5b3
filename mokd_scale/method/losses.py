"""Pure loss functions: DINO cross-entropy over view pairs, its search-target variant, and DINOv2's
KoLeo regulariser. No state, no collectives (the centres are in centers.py).

Every softmax over the K prototypes runs in fp32, whatever dtype the network computed in:
with K = 65536 a bf16 softmax loses most of the teacher's distribution to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo regulariser (Sablayrolles et al., 2018) over one batch of features (B, D):
    -mean_i log ||x_i - x_nn(i)|| of the L2-normalised features, nn(i) the nearest other sample. It depends
    on which samples share the batch: over a micro-batch, as DINOv2 computes it per GPU. fp32."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"KoLeo needs a batch of at least 2 feature vectors (B, D), got {tuple(features.shape)}")
    normed = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour is chosen, not differentiated (as DINOv2)
        dots = normed @ normed.t()
        dots.fill_diagonal_(-1.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(normed, normed[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
