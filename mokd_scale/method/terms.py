"""The per-network MOKD step math: teacher forward, student forward, the four loss terms.

For network X with partner Y (both see the same crops: 2 globals first, then N locals):

  L_sm  X student proj,   all crops   vs X teacher proj,   2 globals, centre c_X proj
  L_st  X student search, all crops   vs X teacher search, 2 globals, centre c_X search  (no query)
  L_cm  X student proj,   all crops   vs Y teacher proj,   2 globals, centre c_Y proj
  L_ct  X student search, local crops vs Y teacher search on Y's global-1 tokens with
        query = detached X-student summary of that local crop; no centre
  L_X = L_sm + L_st + lambda_X * (L_cm + L_ct)

In `independent` mode (plain DINO, the paper's baseline) only L_sm remains: L_X = L_sm.

Pairing. L_sm, L_st and L_cm average over every (teacher global view i, student view v)
with v != i: v == i is the same crop seen by both sides, for the partner's teacher as well
as X's own, because both networks get identical crops. That is 2*(2+N) - 2 pairs. L_ct pairs
local crop v only with the target built from its own query v (N pairs), and its targets
depend on global crop 1 of the teacher side only; global crop 2 never enters L_ct.

Gradients reach X's student only: teachers run under no_grad, queries are detached, and
every target is a detached fp32 tensor. This matters beyond correctness: a loss touching
both DeepSpeed engines would fire the other engine's gradient hooks.

Tensors of views are shaped (views, batch, ...): one softmax, one log-softmax and one search-head
forward cover all views at once.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
from torch import nn

from mokd_scale.method.losses import Centers, dino_cross_entropy, paired_cross_entropy
from mokd_scale.runtime.profiling import phase

MOKD_TERMS = ("self_proj", "self_search", "cross_proj", "cross_search")
INDEPENDENT_TERMS = ("self_proj",)


class TeacherOutputs(NamedTuple):
    """fp32, detached. Search fields are None without a search head (independent mode)."""
    proj: torch.Tensor  # (2, B, K), one view per global crop
    search: torch.Tensor | None  # (2, B, K), no query
    global1_search_tokens: torch.Tensor | None  # (B, N, D): search-head input of global crop 1


class StudentOutputs(NamedTuple):
    proj: torch.Tensor  # (views, B, K) in crop order, fp32
    search: torch.Tensor | None  # (views, B, K)
    local_queries: torch.Tensor | None  # (local views, B, D), detached summaries of the local crops


class LossTerms(NamedTuple):
    """fp32 scalars; a term absent in independent mode is None. `total` has a graph into X's student."""
    self_proj: torch.Tensor
    self_search: torch.Tensor | None
    cross_proj: torch.Tensor | None
    cross_search: torch.Tensor | None
    total: torch.Tensor


def loss_terms(mode: str) -> tuple[str, ...]:
    """The terms a mode computes, in logging order."""
    return MOKD_TERMS if mode == "mokd" else INDEPENDENT_TERMS


def compute_context(device: torch.device, compute_dtype: torch.dtype | None):
    """bf16 autocast on CUDA for fp32 modules (the teachers); a no-op otherwise."""
    if compute_dtype == torch.bfloat16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype inputs must have: DeepSpeed's bf16 mode casts the whole module."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


def split_crops(crops: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if len(crops) < 3:
        raise ValueError(f"got {len(crops)} crops: MOKD needs 2 global crops followed by at least 1 local crop")
    globals_, locals_ = list(crops[:2]), list(crops[2:])
    for group, name in ((globals_, "global"), (locals_, "local")):
        shapes = {tuple(crop.shape) for crop in group}
        if len(shapes) != 1:
            raise ValueError(f"{name} crops must share one shape to be batched, got {sorted(shapes)}")
    return globals_, locals_


def run_batched(network: nn.Module, views: list[torch.Tensor], compute_dtype):
    """One forward over same-size views concatenated along the batch."""
    images = torch.cat(views).to(parameter_dtype(network))
    with compute_context(images.device, compute_dtype):
        return network(images)


def by_view(tensors: Sequence[torch.Tensor | None], batch: int) -> torch.Tensor | None:
    """Batches of views (n_i * B, ...) -> one fp32 tensor (sum n_i, B, ...); None stays None."""
    if tensors[0] is None:
        return None
    joined = torch.cat(list(tensors)) if len(tensors) > 1 else tensors[0]
    return joined.float().view(-1, batch, *joined.shape[1:])


@torch.no_grad()
def teacher_forward(teacher: nn.Module, global_crops: Sequence[torch.Tensor],
                    compute_dtype: torch.dtype | None = None) -> TeacherOutputs:
    """The teacher's targets for one micro-batch; feed proj/search to Centers.accumulate()."""
    if len(global_crops) != 2:
        raise ValueError(f"teacher_forward takes the 2 global crops, got {len(global_crops)}")
    output = run_batched(teacher, list(global_crops), compute_dtype)
    batch = global_crops[0].shape[0]
    tokens = output.search_tokens
    return TeacherOutputs(proj=by_view([output.proj], batch), search=by_view([output.search], batch),
                          global1_search_tokens=None if tokens is None else tokens[:batch].float())


def student_forward(student: nn.Module, crops: Sequence[torch.Tensor], compute_dtype=None) -> StudentOutputs:
    """Globals in one batch and locals in another (each size is one forward)."""
    globals_, locals_ = split_crops(crops)
    batch = crops[0].shape[0]
    global_out = run_batched(student, globals_, compute_dtype)
    local_out = run_batched(student, locals_, compute_dtype)
    queries = None if local_out.summary is None else local_out.summary.detach().view(-1, batch,
                                                                                        local_out.summary.shape[-1])
    return StudentOutputs(proj=by_view([global_out.proj, local_out.proj], batch),
                          search=by_view([global_out.search, local_out.search], batch),
                          local_queries=queries)


@torch.no_grad()
def cross_search_targets(partner_teacher: nn.Module, partner: TeacherOutputs, queries: torch.Tensor,
                         compute_dtype=None) -> torch.Tensor:
    """Partner teacher's search head on its global-1 tokens with each local-crop query, all local
    crops in one forward: (N, B, D) queries -> (N, B, K) fp32 logits."""
    head = partner_teacher.search_head
    dtype = parameter_dtype(head)
    tokens = partner.global1_search_tokens.to(dtype)
    views, batch = queries.shape[0], queries.shape[1]
    repeated = tokens.unsqueeze(0).expand(views, *tokens.shape).reshape(views * batch, *tokens.shape[1:])
    with compute_context(tokens.device, compute_dtype):
        logits = head(repeated, query=queries.reshape(views * batch, -1).to(dtype))
    return logits.float().view(views, batch, -1)


def network_losses(student: nn.Module, crops: Sequence[torch.Tensor], own: TeacherOutputs,
                   partner: TeacherOutputs | None, partner_teacher: nn.Module | None, centers_own: Centers,
                   centers_partner: Centers | None, teacher_temperature: float, student_temperature: float,
                   lambda_cross: float, compute_dtype: torch.dtype | None = None) -> LossTerms:
    """Network X's terms and total for one micro-batch. `student` may be a DeepSpeed engine wrapping
    the MokdNetwork. Without a partner (partner=None: independent mode) only L_sm is computed."""
    with phase("student_forward"):
        student_out = student_forward(student, crops, compute_dtype)
    return student_losses(student_out, own, partner, partner_teacher, centers_own, centers_partner,
                          teacher_temperature, student_temperature, lambda_cross, compute_dtype)


def student_losses(student_out: StudentOutputs, own: TeacherOutputs, partner: TeacherOutputs | None,
                   partner_teacher: nn.Module | None, centers_own: Centers, centers_partner: Centers | None,
                   teacher_temperature: float, student_temperature: float, lambda_cross: float,
                   compute_dtype: torch.dtype | None = None) -> LossTerms:
    """The terms of network_losses() from a student forward already run (a DDP loop runs both
    students' forwards before any loss)."""
    temps = (teacher_temperature, student_temperature)
    if partner is None:
        with phase("losses"):
            self_proj = dino_cross_entropy(student_out.proj, own.proj, *temps, center=centers_own.proj)
        return LossTerms(self_proj, None, None, None, self_proj)
    with phase("cross_search_targets"):
        targets = cross_search_targets(partner_teacher, partner, student_out.local_queries, compute_dtype)
    with phase("losses"):
        num_global = own.proj.shape[0]
        self_proj = dino_cross_entropy(student_out.proj, own.proj, *temps, center=centers_own.proj)
        self_search = dino_cross_entropy(student_out.search, own.search, *temps, center=centers_own.search)
        cross_proj = dino_cross_entropy(student_out.proj, partner.proj, *temps, center=centers_partner.proj)
        cross_search = paired_cross_entropy(student_out.search[num_global:], targets, *temps)
        total = self_proj + self_search + lambda_cross * (cross_proj + cross_search)
    return LossTerms(self_proj, self_search, cross_proj, cross_search, total)
