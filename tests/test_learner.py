"""Learner details: fp32 teachers under a bf16 student, optimizer groups, schedules."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mokd_scale.config import load_config
from mokd_scale.train.schedules import Schedules
from tests.dist_harness import run_on_ranks

BF16_OVERRIDES = ["data.source=synthetic", "train.global_batch_size=4", "train.micro_batch_size=4",
                  "data.samples_per_epoch=64", "mokd.out_dim=64", "mokd.proj_hidden_dim=32",
                  "mokd.proj_bottleneck_dim=16", "data.global_crop_size=16", "data.local_crop_size=8",
                  "data.synthetic_image_size=20", "data.workers=0", "train.warmup_epochs=0",
                  "networks.a.arch_kwargs={patch_size: 4, img_size: 16, embed_dim: 64, depth: 1, num_heads: 1}",
                  "networks.b.arch_kwargs={output_stride: 8, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}",
                  "mokd.search_depth=1", "networks.a.precision=bf16", "networks.b.precision=bf16",
                  "mokd.teacher_momentum=0.9995", "mokd.teacher_momentum_end=0.9995", "networks.a.lr=0.5",
                  "networks.b.lr=0.5", "networks.b.arch=resnet18"]


def bf16_teacher_steps(rank, world_size):
    from mokd_scale.data import build_train_loader
    from tests.steps import learners_and_step

    config = load_config("tiny_cpu", BF16_OVERRIDES)
    learners, train_step = learners_and_step(config)
    batches = iter(build_train_loader(config, 0, 1))
    teacher = learners["a"].teacher
    rounded = {k: v.detach().bfloat16() for k, v in teacher.named_parameters()}
    changed_every_step, differs_from_rounded, losses = [], [], []
    for step in range(3):
        before = {k: v.detach().clone() for k, v in teacher.named_parameters()}
        record = train_step(step, [next(batches)])
        losses.append(record.term("a", "loss"))
        student = dict(learners["a"].student.named_parameters())
        m = 0.9995
        for key, value in rounded.items():  # what a bf16 teacher would hold
            rounded[key] = (m * value.float() + (1 - m) * student[key].detach().float()).bfloat16()
        changed_every_step.append(sum(int(not torch.equal(before[k], v)) for k, v in teacher.named_parameters()))
        differs_from_rounded.append(sum(int(not torch.equal(rounded[k].float(), v)) for k, v in
                                        teacher.named_parameters()))
    dtypes = {v.dtype for v in teacher.parameters()}
    student_dtypes = {v.dtype for v in learners["a"].student.parameters()}
    return changed_every_step, differs_from_rounded, losses, dtypes, student_dtypes, len(list(teacher.parameters()))


@pytest.mark.integration
def test_teacher_stays_fp32_and_moves_every_step_under_a_bf16_student():
    changed, differs, losses, dtypes, student_dtypes, count = run_on_ranks(bf16_teacher_steps, 1, timeout=300)
    assert dtypes == {torch.float32}
    assert student_dtypes == {torch.bfloat16}
    assert all(np.isfinite(losses))
    # Most tensors move each step (frozen weight-norm scales do not), and the fp32 EMA is not
    # what a bf16 teacher would hold: at m = 0.9995 bf16 rounding swallows the increment.
    assert all(n >= count - 2 for n in changed), (changed, count)
    assert all(n >= count // 2 for n in differs), (differs, count)


def ema_after_one_step(rank, world_size, deepspeed_json):
    """Teacher before and after one step, and the student after it, under a ZeRO-2 engine."""
    from mokd_scale.data import build_train_loader
    from tests.steps import learners_and_step

    config = load_config("tiny_cpu", [*BF16_OVERRIDES[:-3], "networks.a.precision=fp32", "networks.b.precision=fp32",
                                      f"networks.a.deepspeed={deepspeed_json}", f"networks.b.deepspeed={deepspeed_json}",
                                      "networks.a.lr=0.5", "networks.b.lr=0.5", "mokd.teacher_momentum=0.9",
                                      "mokd.teacher_momentum_end=0.9"])
    learners, train_step = learners_and_step(config)
    flat_buffers = {n: len(learner.ema.flats) for n, learner in learners.items()}
    before = {n: {k: v.detach().clone() for k, v in learner.teacher.named_parameters()} for n, learner in learners.items()}
    train_step(0, [next(iter(build_train_loader(config, 0, 1, 0)))])
    after = {n: {k: v.detach().clone() for k, v in learner.teacher.named_parameters()} for n, learner in learners.items()}
    student = {n: {k: v.detach().float().clone() for k, v in learner.student.named_parameters()}
               for n, learner in learners.items()}
    return flat_buffers, before, after, student


@pytest.mark.integration
def test_ema_over_deepspeed_flat_buffers_equals_the_per_tensor_update():
    flat_buffers, before, after, student = run_on_ranks(ema_after_one_step, 1, ("ds_configs/zero2_bf16.json",),
                                                         timeout=300)
    assert all(count > 0 for count in flat_buffers.values()), "the flat-buffer path was not taken"
    for name in "ab":
        moved = 0
        for key, old in before[name].items():
            expected = 0.9 * old + 0.1 * student[name][key]
            torch.testing.assert_close(after[name][key], expected, rtol=1e-6, atol=1e-7, msg=f"{name} {key}")
            moved += int(not torch.equal(after[name][key], old))
        assert moved > len(before[name]) // 2


def test_multi_tensor_optimizers_step_like_the_per_tensor_loop():
    from mokd_scale.config import NetworkConfig
    from mokd_scale.engine.optim import build_optimizer

    for kind in ("adamw", "sgd"):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]  # noqa: E731
        ours = build_optimizer(NetworkConfig(optimizer=kind, momentum=0.9), groups(params))
        reference_type = torch.optim.AdamW if kind == "adamw" else torch.optim.SGD
        extra = {"betas": (0.9, 0.999)} if kind == "adamw" else {"momentum": 0.9}
        reference = reference_type(groups(twins), lr=0.0, foreach=False, **extra)
        for step in range(3):
            for optimizer, ps in ((ours, params), (reference, twins)):
                for group in optimizer.param_groups:
                    group["lr"] = 0.1
                for i, p in enumerate(ps):
                    p.grad = torch.full_like(p, float(step + i + 1)).sin()
                optimizer.step()
        for p, twin in zip(params, twins):
            torch.testing.assert_close(p, twin, rtol=1e-6, atol=1e-7)


def test_parameter_groups_tag_last_layer_and_exclude_biases_and_1d_tensors_from_decay():
    from mokd_scale.engine.optim import LAST_LAYER, parameter_groups
    from mokd_scale.models import build_network

    config = load_config("tiny_cpu", BF16_OVERRIDES)
    network = build_network(config, "a")
    groups = {g["name"]: g for g in parameter_groups(network)}
    names = {id(p): n for n, p in network.named_parameters()}
    last = {names[id(p)] for g in groups.values() if g["kind"] == LAST_LAYER for p in g["params"]}
    # The projection head's scale is frozen (not in any group), the search head's is trained.
    assert last == {"projection_head.last_layer.direction", "search_head.last_layer.direction",
                    "search_head.last_layer.scale"}
    for group in groups.values():
        assert group["schedule"] == "own"
        for param in group["params"]:
            if param.ndim <= 1:
                assert not group["apply_weight_decay"], names[id(param)]
    decayed = [p for g in groups.values() if g["apply_weight_decay"] for p in g["params"]]
    assert decayed and all(p.ndim > 1 for p in decayed)


def test_search_head_can_follow_the_partner_schedule_with_decay_on_everything():
    """The authors' CNN steps its search head at the ViT's lr and weight decay, biases and norms included."""
    from mokd_scale.engine.optim import parameter_groups
    from mokd_scale.models import build_network

    config = load_config("tiny_cpu", BF16_OVERRIDES)
    network = build_network(config, "b")
    names = {id(p): n for n, p in network.named_parameters()}
    groups = parameter_groups(network, search_head_schedule="partner")
    partner = [names[id(p)] for g in groups if g["schedule"] == "partner" for p in g["params"]]
    assert partner and all(n.startswith("search_head.") for n in partner)
    assert "search_head.norm.bias" in partner
    assert all(g["apply_weight_decay"] for g in groups if g["schedule"] == "partner")
    own = [names[id(p)] for g in groups if g["schedule"] == "own" for p in g["params"]]
    assert not any(n.startswith("search_head.") for n in own)


def test_schedules_follow_the_recipe_by_global_step():
    config = load_config("tiny_cpu", ["train.steps=200", "data.samples_per_epoch=640", "train.global_batch_size=64",
                                      "train.warmup_epochs=2", "networks.a.lr=0.001", "networks.a.min_lr=1e-5",
                                      "networks.a.warmup_teacher_temperature_epochs=5",
                                      "networks.b.warmup_teacher_temperature_epochs=3",
                                      "mokd.warmup_teacher_temperature=0.04",
                                      "mokd.teacher_temperature=0.07", "train.freeze_last_layer_epochs=1"])
    schedules = Schedules.build(config)
    lr = schedules.networks["a"].lr
    peak = 0.001 * 64 / 256
    # DINO's shapes: warm-up 0 -> peak with both ends included, then a cosine that approaches min_lr.
    assert lr[0] == 0.0 and lr[19] == pytest.approx(peak) and lr[20] == pytest.approx(peak)
    assert lr[-1] == pytest.approx(1e-5 + 0.5 * (peak - 1e-5) * (1 + np.cos(np.pi * 179 / 180)))
    assert np.all(np.diff(lr[:20]) > 0) and np.all(np.diff(lr[20:]) <= 1e-12)
    # The teacher temperature steps once per epoch (10 steps here), over each network's own warm-up.
    for name, epochs in (("a", 5), ("b", 3)):
        temperature = schedules.networks[name].teacher_temperature
        per_epoch = np.linspace(0.04, 0.07, epochs)
        for epoch in range(epochs):
            assert np.all(temperature[epoch * 10:(epoch + 1) * 10] == pytest.approx(per_epoch[epoch]))
        assert np.all(temperature[epochs * 10:] == pytest.approx(0.07))
    assert schedules.at(25).networks["a"].teacher_temperature == pytest.approx(0.055)
    assert schedules.at(25).networks["b"].teacher_temperature == pytest.approx(0.07)
    assert schedules.teacher_momentum[0] == pytest.approx(config.mokd.teacher_momentum)
    assert 0.9999 < schedules.teacher_momentum[-1] < 1.0
    assert schedules.at(9).last_layer_frozen and not schedules.at(10).last_layer_frozen
    assert schedules.at(10_000).networks["a"].lr == schedules.at(199).networks["a"].lr  # clamped past the end
    logged = schedules.at(25).log_items()  # metrics.jsonl keys, one mapping
    assert list(logged) == ["teacher_momentum", "lr.a", "wd.a", "teacher_temperature.a", "lr.b", "wd.b",
                            "teacher_temperature.b"]
    assert logged["teacher_temperature.a"] == pytest.approx(0.055)
