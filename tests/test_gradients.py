"""GradientGate on 2 ranks: per-tensor clipping under every ZeRO stage equals a per-tensor reference,
the frozen last layer accumulates no optimizer state, and a non-finite gradient stops every rank.

The update is read back from the weights: with SGD at lr 1, no momentum and no weight decay, a step
moves every parameter by exactly minus its (clipped) gradient.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from mokd_scale.config import load_config
from tests.dist_harness import run_on_ranks

pytestmark = pytest.mark.integration

ZERO_CONFIGS = {0: "ds_configs/zero0_fp32_cpu.json", 1: "ds_configs/zero1_bf16.json",
                2: "ds_configs/zero2_bf16.json", 3: "ds_configs/zero3_bf16.json"}
GLOBAL_BATCH = 8


def sgd_config(stage: int, clip: float, extra=()):
    """A tiny pair where one step of SGD at lr 1 subtracts the gradient itself."""
    overrides = ["data.source=synthetic", "data.workers=0", f"train.global_batch_size={GLOBAL_BATCH}",
                 "train.micro_batch_size=2", "data.samples_per_epoch=64", "train.steps=4", "train.warmup_epochs=0",
                 "mokd.out_dim=32", "mokd.proj_hidden_dim=16", "mokd.proj_bottleneck_dim=8", "mokd.search_depth=1",
                 "data.global_crop_size=16", "data.local_crop_size=8", "data.synthetic_image_size=20",
                 "networks.a.arch_kwargs={patch_size: 4, img_size: 16, embed_dim: 64, depth: 1, num_heads: 1}",
                 "networks.b.arch_kwargs={output_stride: 8, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}"]
    for name in "ab":
        overrides += [f"networks.{name}.optimizer=sgd", f"networks.{name}.momentum=0",
                      f"networks.{name}.lr={256 / GLOBAL_BATCH}", f"networks.{name}.min_lr={256 / GLOBAL_BATCH}",
                      f"networks.{name}.weight_decay=0", f"networks.{name}.weight_decay_end=0",
                      f"networks.{name}.clip_grad={clip}", f"networks.{name}.deepspeed={ZERO_CONFIGS[stage]}",
                      f"networks.{name}.proj_freeze_scale=false"]
    return load_config("tiny_cpu", overrides + list(extra))


def build(config, world_size):
    from tests.steps import learners_and_step
    return learners_and_step(config, world_size=world_size)


def whole_parameters(learner) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the student's parameters (gathered under ZeRO-3)."""
    import deepspeed
    params = dict(learner.student.named_parameters())
    gather = deepspeed.zero.GatheredParameters(list(params.values())) if learner.zero_stage == 3 \
        else contextlib.nullcontext()
    with gather:
        return {name: p.detach().float().clone() for name, p in params.items()}


def micro_batches(config, rank, world_size):
    from mokd_scale.data import build_train_loader
    loader = build_train_loader(config, rank, world_size, 0)
    batches = iter(loader)
    return [next(batches) for _ in range(loader.micro_batches_per_step)]


def step_updates(rank, world_size, stage, clip):
    """Minus the update of every student parameter after one step (= the gradient the optimizer used)."""
    config = sgd_config(stage, clip)
    learners, train_step = build(config, world_size)
    before = {n: whole_parameters(learner) for n, learner in learners.items()}
    train_step(0, micro_batches(config, rank, world_size))
    after = {n: whole_parameters(learner) for n, learner in learners.items()}
    return {n: {k: before[n][k] - after[n][k] for k in before[n]} for n in learners}


def clip_per_tensor(gradients: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """DINO's rule, tensor by tensor."""
    clipped = {}
    for name, grad in gradients.items():
        factor = clip / (grad.norm() + 1e-6)
        clipped[name] = grad * factor if factor < 1 else grad
    return clipped


def all_stage_updates(rank, world_size, clip):
    return {"raw": step_updates(rank, world_size, 0, 0.0),
            **{stage: step_updates(rank, world_size, stage, clip) for stage in (0, 1, 2, 3)}}


def test_per_tensor_clipping_equals_reference_under_every_zero_stage():
    clip = 0.05
    updates = run_on_ranks(all_stage_updates, 2, (clip,), timeout=400)
    for name in "ab":
        reference = clip_per_tensor(updates["raw"][name], clip)
        clipped = sum(int(not torch.equal(reference[k], updates["raw"][name][k])) for k in reference)
        assert 0 < clipped < len(reference), "the test must clip some tensors and leave others"
        for stage in (0, 1, 2, 3):
            for key, expected in reference.items():
                got = updates[stage][name][key]
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{name} {key} ZeRO-{stage}")
                assert got.norm() <= clip * (1 + 1e-5)


def freeze_run(rank, world_size, stage):
    """Two frozen steps, then one free step; AdamW on network a, SGD with momentum on network b."""
    config = sgd_config(stage, 3.0, ["networks.a.optimizer=adamw", "networks.b.momentum=0.9",
                                     "networks.a.lr=0.01", "networks.b.lr=0.01", "networks.a.weight_decay=0.04",
                                     "networks.b.weight_decay=0.04", "train.freeze_last_layer_epochs=0.25"])
    learners, train_step = build(config, world_size)
    assert train_step.schedules.freeze_last_layer_steps == 2
    batches = micro_batches(config, rank, world_size)
    initial = {n: whole_parameters(learner) for n, learner in learners.items()}
    record = []
    for step in range(3):
        train_step(step, batches)
        record.append({n: (whole_parameters(learner), optimizer_state_by_kind(learner)) for n, learner in learners.items()})
    return initial, record


def optimizer_state_by_kind(learner) -> dict[str, int]:
    """How many state tensors the torch optimizer holds for each kind of group."""
    optimizer = learner.engine.basic_optimizer
    counts = {}
    for group in optimizer.param_groups:
        held = sum(len(optimizer.state.get(p, {})) for p in group["params"])
        counts[group["kind"]] = counts.get(group["kind"], 0) + held
    return counts


@pytest.mark.parametrize("stage", [0, 2])
def test_frozen_last_layer_takes_no_update_and_builds_no_optimizer_state(stage):
    initial, record = run_on_ranks(freeze_run, 2, (stage,), timeout=300)
    for name in "ab":
        last = [k for k in initial[name] if ".last_layer." in k]
        assert last and all(k.endswith(("direction", "scale")) for k in last)
        for step in (0, 1):
            weights, state = record[step][name]
            assert state["last_layer"] == 0, f"{name} step {step}: optimizer state for a frozen last layer"
            assert state["regular"] > 0
            for key in last:
                torch.testing.assert_close(weights[key], initial[name][key], rtol=0, atol=0)
            assert any(not torch.equal(weights[k], initial[name][k]) for k in initial[name] if k not in last)
        weights, state = record[2][name]
        assert state["last_layer"] > 0
        # Every last-layer tensor is trainable here (sgd_config unfreezes the projection scale).
        assert all(not torch.equal(weights[k], record[1][name][0][k]) for k in last)
