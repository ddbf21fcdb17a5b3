"""The forwards the loss terms read: teachers on the global crops, a student on all crops, and a partner
teacher's search head queried by a student's local crops (the cross-search targets).

Tensors of views are shaped (views, batch, ...): one softmax, one log-softmax and one search-head
forward cover all views at once. Everything a teacher gives is detached fp32, and the queries are
detached: gradients of a network's loss reach that network's student only (a loss touching two
DeepSpeed engines would fire the other engine's gradient hooks).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple, Sequence

import torch
from torch import nn



class TeacherOutputs(NamedTuple):
    """fp32, detached. Search fields are None without a search head (independent mode)."""
    proj: torch.Tensor  # (2, B, K), one view per global crop
    search: torch.Tensor | None  # (2, B, K), no query
    global1_search_tokens: torch.Tensor | None  # (B, N, D): search-head input of global crop 1


class StudentOutputs(NamedTuple):
    proj: torch.Tensor  # (views, B, K) in crop order, fp32
    search: torch.Tensor | None  # (views, B, K)
    local_queries: torch.Tensor | None  # (local views, B, D), detached summaries of the local crops
    global_pooled: torch.Tensor  # (2 * B, pooled dim): the backbone's pooled features of the global crops


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
                          local_queries=queries, global_pooled=global_out.pooled)


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
