"""mokd-bench step's DDP reference loop runs the project's own step math (loss terms, clipping,
optimizers, EMA, centres): on the same batches it gives the real step's losses and weights, so
comparing the two loops measures engine and order only."""
from __future__ import annotations

import torch

from tests.dist_harness import run_on_ranks
from tests.test_bench import TINY
import pytest

pytestmark = pytest.mark.integration

STEPS = 2


def both_loops(rank, world_size, sets):
    from mokd_scale.runtime import dist
    from mokd_scale.tools.bench.step import DdpStep, OurStep, bench_config, bench_micro_batches, recipe_overrides

    info = dist.DistInfo(rank, world_size, rank, torch.device("cpu"))
    config = bench_config("tiny_cpu", recipe_overrides(sets, 0), world_size, 1)
    pool = bench_micro_batches(config, info, STEPS)
    loops = {"ours": OurStep(config, info), "ddp": DdpStep(config, info)}
    students = {"ours": {n: learner.student for n, learner in loops["ours"].learners.items()},
                "ddp": {n: net.student.module.network for n, net in loops["ddp"].networks.items()}}
    teachers = {"ours": {n: learner.teacher for n, learner in loops["ours"].learners.items()},
                "ddp": {n: net.teacher for n, net in loops["ddp"].networks.items()}}

    def weights(loop):
        return {f"{n}.{part}.{k}": v.detach().clone() for part, modules in (("student", students), ("teacher", teachers))
                for n, module in modules[loop].items() for k, v in module.state_dict().items()}

    initial = {loop: weights(loop) for loop in loops}
    losses = {loop: [] for loop in loops}
    for step in range(STEPS):
        for name, loop in loops.items():
            terms = loop.step(step, [pool[step]])
            losses[name].append({n: t.tolist() for n, t in terms.items()})
    return initial, losses, {loop: weights(loop) for loop in loops}


def assert_same_loops(initial, losses, final) -> None:
    assert initial["ours"].keys() == initial["ddp"].keys()
    for key, value in initial["ours"].items():  # same seed, same construction order: same networks
        torch.testing.assert_close(initial["ddp"][key], value, rtol=0, atol=0, msg=key)
    for step in range(STEPS):
        for name in ("a", "b"):
            torch.testing.assert_close(torch.tensor(losses["ddp"][step][name]), torch.tensor(losses["ours"][step][name]),
                                       rtol=1e-5, atol=1e-6, msg=f"step {step}, network {name}")
    moved = [k for k, v in initial["ours"].items() if ".student." in k and not torch.equal(v, final["ours"][k])]
    assert moved  # the loops updated weights, and did it alike
    for key, value in final["ours"].items():
        torch.testing.assert_close(final["ddp"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_loop_gives_the_real_steps_losses_and_weights():
    assert_same_loops(*run_on_ranks(both_loops, 1, args=(TINY,), timeout=300))


def test_ddp_loop_follows_global_clipping_and_sgd_too():
    sets = TINY + ["networks.b.optimizer=sgd", "networks.b.clip_mode=global", "networks.b.clip_grad=0.01"]
    assert_same_loops(*run_on_ranks(both_loops, 1, args=(sets,), timeout=300))
