"""mokd-bench ops: the operator counter's kinds and phase attribution on operators whose
dispatch is known, and the sub-command end to end on a tiny pair."""
from __future__ import annotations

import copy

import torch

from mokd_scale.runtime.profiling import phase
from mokd_scale.tools.bench.ops import OperatorCounter, is_host_sync, kind_of
from tests.dist_harness import run_on_ranks
from tests.test_bench import TINY, run_bench
import pytest

pytestmark = pytest.mark.integration

aten = torch.ops.aten


def test_kinds_follow_the_documented_rule():
    views = [aten.view.default, aten.t.default, aten.detach.default, aten.split.Tensor, aten.expand.default,
             aten.unsqueeze_.default, aten.empty.memory_format, aten.empty_strided.default, aten._unsafe_view.default,
             torch.ops.profiler._record_function_enter_new.default]
    launching = [aten.addmm.default, aten.copy_.default, aten._to_copy.default, aten.zero_.default,
                 aten._foreach_add_.List, aten._local_scalar_dense.default, aten.clone.default]
    collectives = [torch.ops.c10d.allreduce_.default, torch.ops.c10d._allgather_base_.default]
    assert {op: kind_of(op) for op in views} == {op: "views" for op in views}
    assert {op: kind_of(op) for op in launching} == {op: "launching" for op in launching}
    assert {op: kind_of(op) for op in collectives} == {op: "collectives" for op in collectives}
    assert is_host_sync(aten._local_scalar_dense.default) and is_host_sync(aten.nonzero.default)
    assert not is_host_sync(aten.addmm.default) and not is_host_sync(aten.copy_.default)


def test_counter_attributes_forward_and_backward_operators_to_their_phases():
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    counter = OperatorCounter()
    with counter:
        with phase("forward"):
            loss = layer(x).sum()
        with phase("backward"):
            loss.backward()  # autograd runs a CPU backward in this thread: seen, and in this phase
        y = x * 2
    summary = counter.summary()
    forward, backward = summary["phases"]["forward"], summary["phases"]["backward"]
    assert {n: c for n, c in forward["ops"].items() if summary["kinds"][n] == "launching"} == {
        "aten::addmm.default": 1, "aten::sum.default": 1}
    assert forward["ops"]["aten::t.default"] == 1 and forward["collectives"] == 0
    assert backward["ops"]["aten::mm.default"] == 1  # the weight's gradient; x needs none
    assert backward["ops"]["aten::sum.dim_IntList"] == 1  # the bias's gradient
    assert summary["phases"]["other"]["ops"] == {"aten::mul.Tensor": 1}
    assert list(summary["phases"]) == ["forward", "backward", "other"]  # in order of appearance
    for kind in ("launching", "views", "collectives", "host_syncs"):
        assert summary["per_step"][kind] == sum(p[kind] for p in summary["phases"].values())
    assert layer.weight.grad is not None and y.shape == x.shape


def test_counter_reports_per_step_means():
    x = torch.zeros(3)
    counter = OperatorCounter()
    with counter:
        for step in range(4):
            with phase("step"):
                x.add_(1).view(-1)
                if step == 0:
                    x.mul_(2)  # once in four steps
    step = counter.summary(steps=4)["phases"]["step"]
    aten_ops = {name: n for name, n in step["ops"].items() if name.startswith("aten::")}
    assert aten_ops == {"aten::add_.Tensor": 1, "aten::view.default": 1, "aten::mul_.Tensor": 0.25}
    assert (step["launching"], step["views"]) == (1.25, 3)  # views: view, and phase()'s enter/exit markers


def collective_counts(rank, world_size):
    counter = OperatorCounter()
    with counter:
        with phase("reduce"):
            torch.distributed.all_reduce(torch.ones(2))
            torch.ones(1).item()
    return counter.summary()["phases"]["reduce"]


def test_counter_sees_collectives_and_host_syncs():
    reduce = run_on_ranks(collective_counts, 1)
    assert reduce["collectives"] == 1 and reduce["host_syncs"] == 1


def test_ops_subcommand_counts_both_zero_stages_and_the_ddp_loop(tmp_path):
    report = run_bench(tmp_path, "ops", "--config", "tiny_cpu", "--zero", "0,2", "--threads", "1",
                       "--set", *TINY)
    assert list(report["loops"]) == ["ours_zero0", "ours_zero2", "ddp"]
    assert report["width"] == "tiny" and report["crops"]["local"] == 2 and report["world_size"] == 1
    for name, loop in report["loops"].items():
        phases = loop["phases"]
        # The step's marked phases appear, and backward ran inside the counter.
        for expected in ("teacher_forward", "student_forward", "cross_search_targets", "losses", "student_backward",
                         "grad_clip", "optimizer", "ema", "centers"):
            assert phases[expected]["launching"] > 0, (name, expected)
        backward_ops = phases["student_backward"]["ops"]
        assert any("backward" in op for op in backward_ops), (name, list(backward_ops)[:10])
        for kind in ("launching", "views", "collectives"):
            assert loop["per_step"][kind] == sum(p[kind] for p in phases.values())
        assert phases["centers"]["collectives"] >= 1  # the centres' global-batch mean
    # The DDP loop's per-rank loss check reads the loss on the host once per micro-batch.
    assert report["loops"]["ddp"]["phases"]["finite_check"]["host_syncs"] == 1


def test_counter_sees_the_kernels_of_compiled_regions():
    import torch._inductor.config

    from mokd_scale.tools.bench.compiled import kernels_reported

    torch.manual_seed(0)
    eager = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.LayerNorm(8))
    compiled = copy.deepcopy(eager)
    compiled.compile(dynamic=False)
    x = torch.randn(4, 8)
    counts = {}
    with kernels_reported(), torch._inductor.config.patch(compile_threads=1):
        for model in (eager, compiled):  # compiles here, so its kernels report their calls; gradients exist
            model(x).sum().backward()
        for name, model in (("eager", eager), ("compiled", compiled)):
            counter = OperatorCounter()
            with counter:
                with phase("forward"):
                    loss = model(x).sum()
                with phase("backward"):
                    loss.backward()
            counts[name] = counter.summary()
    forward = counts["compiled"]["phases"]["forward"]["ops"]
    generated = [op for op in forward if op.startswith("inductor::cpp_fused")]
    assert generated and all(counts["compiled"]["kinds"][op] == "launching" for op in generated)
    assert "aten::gelu.default" in counts["eager"]["phases"]["forward"]["ops"]
    assert "aten::gelu.default" not in forward  # the region ran compiled, under the counter
    assert any(op.startswith("inductor::") for op in counts["compiled"]["phases"]["backward"]["ops"])
    assert counts["compiled"]["per_step"]["launching"] < counts["eager"]["per_step"]["launching"], (
        counts["compiled"]["phases"], counts["eager"]["phases"])
