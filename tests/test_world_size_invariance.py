"""Invariant 1: at a fixed global batch, the loss terms, the updated centres and the student
gradients do not depend on how many ranks share the batch.

2 gloo ranks x 4 images (each rank in 2 micro-batches of 2) against 1 process x 8 images in
one micro-batch. Two tiny ViTs of different depth: LayerNorm only, because BatchNorm
statistics are per rank and would legitimately differ.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist_harness import run_on_ranks
from tests.test_losses import build_pair, make_crops, network_terms, sides_of, tiny_config
import pytest

pytestmark = pytest.mark.integration

GLOBAL_BATCH = 8
NUM_LOCAL = 2
TERMS = ("self_proj", "self_search", "cross_proj", "cross_search", "total")
LAMBDA = {"a": 0.1, "b": 1.0}


def all_reduce_mean(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor / world_size


def mokd_step(rank: int, world_size: int, micro_batches: int) -> dict:
    """One MOKD step on this rank's slice of the global batch; returns numpy results."""
    torch.manual_seed(0)
    config = tiny_config()
    students, teachers, centers = build_pair(config, seed=0)
    crops = make_crops(GLOBAL_BATCH, NUM_LOCAL, seed=1)
    per_rank = GLOBAL_BATCH // world_size
    mine = [crop[rank * per_rank:(rank + 1) * per_rank] for crop in crops]
    micro = [[crop.chunk(micro_batches)[m] for crop in mine] for m in range(micro_batches)]
    terms = {f"{x}.{t}": torch.zeros(()) for x in ("a", "b") for t in TERMS}
    for batch in micro:
        sides = sides_of(teachers, centers, batch)
        for n in ("a", "b"):
            centers[n].accumulate(sides[n].targets.proj, sides[n].targets.search)
        for x in ("a", "b"):
            losses = network_terms(config, x, students[x], batch, sides, LAMBDA[x])
            (losses["total"] / micro_batches).backward()  # gradient accumulation
            for t in TERMS:
                terms[f"{x}.{t}"] += losses[t].detach() / micro_batches
    for n in ("a", "b"):
        centers[n].update()
    results = {name: all_reduce_mean(value, world_size) for name, value in terms.items()}
    for n in ("a", "b"):
        results[f"{n}.center.proj"] = centers[n].proj
        results[f"{n}.center.search"] = centers[n].search
        for pname, p in students[n].named_parameters():
            if p.grad is not None:
                results[f"{n}.grad.{pname}"] = all_reduce_mean(p.grad.clone(), world_size)
    # numpy: pickled by value through the harness's queue.
    return {name: value.detach().numpy().copy() for name, value in results.items()}


def test_losses_centres_and_gradients_do_not_depend_on_world_size():
    two_ranks = run_on_ranks(mokd_step, world_size=2, args=(2,), timeout=120)
    one_rank = mokd_step(0, 1, 1)
    assert two_ranks.keys() == one_rank.keys()
    assert sum(name.startswith("a.grad.") for name in one_rank) > 20
    for name, expected in one_rank.items():
        actual = torch.from_numpy(two_ranks[name])
        expected = torch.from_numpy(expected)
        scale = expected.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(scale), msg=name)
