"""Where each loss term pushes a network's backbone (`train.term_gradients_every`).

On a measuring step, before the real forward of the first micro-batch, the student runs once more on
the same crops as a plain module (outside its DeepSpeed engine), and for each weighted term
torch.autograd.grad of that term alone with respect to the backbone parameters gives its gradient; the
L2 norm over all backbone tensors is reported. Outside the engine, because DeepSpeed hooks the outputs
of the engine's forward: any backward through them runs the engine's backward prologue (optimizer state
for ZeRO, an error under ZeRO-0) and divides by the accumulation steps. The measuring forward sees the
RNG state and BatchNorm buffers the real forward then sees again (both are restored), so it draws the
same stochastic-depth masks on the same batch: the measured terms are those of the real step, and the
real step is the one it would have been without measuring. autograd.grad returns gradients without
adding them to `.grad`, so DeepSpeed's gradient hooks and the update see nothing of it.

Under several ranks each rank's gradient is that of its own micro-batch; the ranks' gradient vectors are
averaged with one all-reduce per term (as DeepSpeed averages the real gradient) before the norm, so the
number is the norm of the term's gradient over the first micro-batch of every rank together, the same
on every rank. Cost, on measuring steps only: one more student forward, one backward per term through
the backbone and, with several ranks, one all-reduce of a backbone-sized vector per term.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as torch_dist
from torch import nn

from mokd_scale.config import Config, ConfigError
from mokd_scale.engine.deepspeed_config import zero_stage_of
from mokd_scale.runtime import dist


def backbone_gradient_norms(contributions: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict[str, float]:
    """{term: ‖∂ contribution / ∂ backbone‖} over `params`, averaged over ranks."""
    norms = {}
    for term, value in contributions.items():
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        norms[term] = rank_mean_norm([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])
    return norms


@contextlib.contextmanager
def replayable(module: nn.Module):
    """Whatever runs inside leaves the RNG (CPU and the current CUDA device) and the module's buffers
    (BatchNorm statistics) as they were, so that the next forward is the one it would have been."""
    buffers = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


def rank_mean_norm(grads: list[torch.Tensor]) -> float:
    """L2 norm of the mean over ranks of the concatenated gradients (one rank: their norm)."""
    if not dist.is_dist() or torch_dist.get_world_size() == 1:
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float()))
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    return float(torch.linalg.vector_norm(flat) / torch_dist.get_world_size())


def check_term_gradients(config: Config) -> None:
    """Before any process group: ZeRO-3 gathers and releases parameters in backward hooks that a second
    backward through the same graph would run again."""
    if not config.train.term_gradients_every:
        return
    for name, net in config.networks.items():
        if zero_stage_of(net) == 3:
            raise ConfigError(f"train.term_gradients_every needs ZeRO-0/1/2, but networks.{name}.deepspeed "
                              f"({net.deepspeed}) is ZeRO-3: use another config or train.term_gradients_every=0")
