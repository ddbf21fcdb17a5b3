"""The step's speed-ups keep its numbers: regional torch.compile (train.compile), channels_last
CNNs (fp32 here) and ZeRO-2 without DeepSpeed's own per-tensor gradient checks (bf16) give the
same losses and updated weights as the plain step."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from mokd_scale.config import load_config
from tests.dist_harness import run_on_ranks

# Tiny fp32 pair with what the flagship uses around the blocks: ZeRO-2 flat buffers, gradient
# checkpointing, two crop sizes, SGD on the CNN (an update linear in the gradient, so weights
# compare at fp32 tolerance; AdamW's update would magnify rounding in near-zero gradients).
TINY = ["data.source=synthetic", "train.global_batch_size=4", "train.micro_batch_size=4",
        "data.samples_per_epoch=64", "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
        "data.global_crop_size=16", "data.local_crop_size=8", "data.synthetic_image_size=20", "data.workers=0",
        "train.warmup_epochs=0", "mokd.search_depth=1", "networks.b.arch=resnet18",
        "networks.a.arch_kwargs={patch_size: 4, img_size: 16, embed_dim: 64, depth: 1, num_heads: 1}",
        "networks.b.arch_kwargs={output_stride: 8, stem_width: 8, channels: [8, 8, 8, 8], layers: [1, 1, 1, 1]}",
        "networks.a.optimizer=sgd", "networks.b.optimizer=sgd", "networks.a.lr=0.5", "networks.b.lr=0.5",
        "networks.a.deepspeed=ds_configs/zero2_bf16.json", "networks.b.deepspeed=ds_configs/zero2_bf16.json",
        "networks.a.grad_checkpointing=true", "networks.b.grad_checkpointing=true"]
STEPS = 2


def build(config, compiled: tuple[str, ...] = ()):
    """The real Learners and step; `compiled` networks get train.compile=true."""
    from mokd_scale.data import build_train_loader
    from mokd_scale.engine.learner import Learner
    from mokd_scale.method.objective import Objective
    from mokd_scale.models import pair_search_dim
    from mokd_scale.train.schedules import Schedules
    from mokd_scale.train.step import Step

    torch.manual_seed(0)
    device = torch.device("cpu")
    learners = {}
    for name in config.networks:
        train = dataclasses.replace(config.train, compile=name in compiled)
        learners[name] = Learner(name, dataclasses.replace(config, train=train), pair_search_dim(config), device, 1)
    train_step = Step(learners, Objective(config), Schedules.build(config), config)
    return learners, train_step, iter(build_train_loader(config, rank=0, world_size=1))


def run_steps(config, compiled: tuple[str, ...] = ()) -> dict:
    """STEPS steps of the real step: losses, then every student and teacher tensor."""
    learners, train_step, batches = build(config, compiled)
    losses = []
    for step in range(STEPS):
        record = train_step(step, [next(batches)])
        losses.append([record.term(n, t) for n in "ab" for t in record.term_names])
    weights = {f"{n}.{part}.{k}": v.detach().float().clone() for n, learner in learners.items()
               for part, module in (("student", learner.student), ("teacher", learner.teacher))
               for k, v in module.state_dict().items()}
    layouts = {n: learner.teacher.backbone.channels_last for n, learner in learners.items()}
    checks = {n: (learner.engine._config.zero_config.compute_grad_norm,
                  learner.engine._config.bfloat16_config.check_grad_overflow) for n, learner in learners.items()}
    return {"losses": losses, "weights": weights, "channels_last": layouts, "deepspeed_checks": checks}


def assert_same_step(plain: dict, other: dict) -> None:
    torch.testing.assert_close(torch.tensor(other["losses"]), torch.tensor(plain["losses"]), rtol=1e-5, atol=1e-6)
    assert plain["weights"].keys() == other["weights"].keys()  # compiling renames nothing
    for key, value in plain["weights"].items():
        torch.testing.assert_close(other["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = [k for k, v in plain["weights"].items() if ".student." in k and "running" not in k]
    assert moved  # the comparison covers updated weights, not only the initial ones


def compiled_rank(rank, world_size):
    import torch._inductor.config

    torch._inductor.config.compile_threads = 1  # a pool of compile workers costs more than it saves on 2 cores
    config = load_config("tiny_cpu", TINY)
    # Network a only (ViT blocks, search head, projection head: 10 graphs, about 80 CPU-seconds of
    # compiling with an empty inductor cache); the ResNet's blocks go through the same code.
    return run_steps(config), run_steps(config, compiled=("a",))


@pytest.mark.integration
def test_compiled_step_gives_the_eager_losses_and_weights():
    plain, compiled = run_on_ranks(compiled_rank, 1, timeout=600)
    assert_same_step(plain, compiled)


def channels_last_rank(rank, world_size):
    import mokd_scale.engine.learner as learner

    config = load_config("tiny_cpu", TINY)
    plain = run_steps(config)
    # What a bf16 run on a GPU does, forced on the CPU in fp32 where the numbers can be compared.
    learner.wants_channels_last = lambda network, device, dtype: not network.backbone.is_vit
    return plain, run_steps(config)


@pytest.mark.integration
def test_channels_last_cnn_step_gives_the_default_layout_losses_and_weights():
    plain, nhwc = run_on_ranks(channels_last_rank, 1, timeout=300)
    assert plain["channels_last"] == {"a": False, "b": False}
    assert nhwc["channels_last"] == {"a": False, "b": True}
    assert_same_step(plain, nhwc)


def test_channels_last_is_chosen_for_cnns_in_bf16_on_gpus_only():
    from mokd_scale.engine.learner import wants_channels_last
    from mokd_scale.models import build_network

    config = load_config("tiny_cpu", TINY)
    vit, cnn = (build_network(config, name) for name in "ab")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_channels_last(cnn, cuda, torch.bfloat16)
    assert not wants_channels_last(cnn, cuda, torch.float32)
    assert not wants_channels_last(cnn, cpu, torch.bfloat16)
    assert not wants_channels_last(vit, cuda, torch.bfloat16)


def test_compile_regions_are_every_block_and_both_heads():
    from mokd_scale.models import build_network
    from mokd_scale.models.compile import compile_regions

    config = load_config("tiny_cpu", TINY + ["networks.b.arch_kwargs.layers=[2, 1, 1, 3]"])
    for name, blocks in (("a", 1), ("b", 7)):
        network = build_network(config, name)
        regions = compile_regions(network, backend="eager")
        assert len(regions) == blocks + 2
        assert network.projection_head in regions and network.search_head in regions
        assert all(module._compiled_call_impl is not None for module in regions)


def test_compile_refuses_unknown_backbones_and_zero3():
    from mokd_scale.engine.learner import Learner
    from mokd_scale.models import pair_search_dim

    config = load_config("tiny_cpu", TINY + ["train.compile=true", "networks.b.arch=convnext_atto",
                                             "networks.b.arch_kwargs={}", "data.global_crop_size=64"])
    with pytest.raises(ValueError, match="train.compile knows the transformer blocks of token models and ResNet"):
        Learner("b", config, pair_search_dim(config), torch.device("cpu"), 1)
    config = load_config("tiny_cpu", TINY + ["train.compile=true", "networks.a.deepspeed=ds_configs/zero3_bf16.json"])
    with pytest.raises(ValueError, match="train.compile with ZeRO-3"):
        Learner("a", config, pair_search_dim(config), torch.device("cpu"), 1)


BF16 = ["networks.a.precision=bf16", "networks.b.precision=bf16"]


def deepspeed_checks_rank(rank, world_size, json_path):
    default = load_config("tiny_cpu", TINY + BF16)
    explicit = load_config("tiny_cpu", TINY + BF16 + [f"networks.{n}.deepspeed={json_path}" for n in "ab"])
    return run_steps(default), run_steps(explicit)


@pytest.mark.integration
def test_zero2_without_deepspeeds_own_gradient_checks_gives_the_same_step(tmp_path):
    from mokd_scale.config import deepspeed_json_path

    ds = json.loads(deepspeed_json_path("ds_configs/zero2_bf16.json").read_text())
    ds["zero_optimization"]["compute_grad_norm"] = True  # a config that says so keeps DeepSpeed's checks
    ds["bf16"]["check_grad_overflow"] = True
    path = tmp_path / "zero2_checked.json"
    path.write_text(json.dumps(ds))
    skipped, checked = run_on_ranks(deepspeed_checks_rank, 1, args=(str(path),), timeout=300)
    # Per-tensor clipping: GradientGate's norms and non-finite check replace DeepSpeed's.
    assert skipped["deepspeed_checks"] == {"a": (False, False), "b": (False, False)}
    assert checked["deepspeed_checks"] == {"a": (True, True), "b": (True, True)}
    assert_same_step(checked, skipped)


def nan_rank(rank, world_size):
    from mokd_scale.train.step import NonFiniteLoss

    learners, train_step, batches = build(load_config("tiny_cpu", TINY + BF16))
    assert not learners["a"].engine._config.bfloat16_config.check_grad_overflow
    before = {k: v.detach().clone() for k, v in learners["a"].student.named_parameters()}
    os.environ["MOKD_FAULTS"] = "nan@0"  # network a's loss is NaN at step 0 (mokd_scale/runtime/faults.py)
    try:
        train_step(0, [next(batches)])
    except NonFiniteLoss as error:
        unchanged = all(torch.equal(before[k], v) for k, v in learners["a"].student.named_parameters())
        return str(error), unchanged
    return None, None


@pytest.mark.integration
def test_a_non_finite_bf16_zero2_gradient_still_stops_the_step_unapplied():
    message, unchanged = run_on_ranks(nan_rank, 1, timeout=300)
    assert message is not None and "network a" in message
    assert unchanged


def test_deepspeed_keeps_its_gradient_norm_where_it_clips():
    from mokd_scale.engine.deepspeed_config import deepspeed_config

    config = load_config("tiny_cpu", TINY + ["networks.a.clip_mode=global"])
    clipped = deepspeed_config(config.networks.a, config, 1, torch.float32)
    assert clipped["gradient_clipping"] == 3.0 and "compute_grad_norm" not in clipped["zero_optimization"]
    per_tensor = deepspeed_config(config.networks.b, config, 1, torch.float32)
    assert per_tensor["gradient_clipping"] == 0 and per_tensor["zero_optimization"]["compute_grad_norm"] is False
