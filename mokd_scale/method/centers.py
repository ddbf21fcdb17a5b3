"""One network's centres (DINO's c): an EMA of its teacher's logits over the global batch, reduced
across ranks, so that a centre does not depend on how many ranks share the batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


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
