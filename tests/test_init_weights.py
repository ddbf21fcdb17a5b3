"""networks.X.init: a network starts from an export, a timm state dict or a checkpoint of this package;
keys match strictly, mismatches are ConfigErrors naming the key, a resumed run ignores init."""
from __future__ import annotations

import contextlib
import io

import pytest
import timm
import torch
from safetensors.torch import save_file

from mokd_scale.config import ConfigError, load_config
from mokd_scale.engine.learner import build_student_and_teacher
from mokd_scale.models import build_network, pair_search_dim
from mokd_scale.tools import export
from mokd_scale.train.init_weights import check_initial_weights, initial_weights
from tests.test_export import write_fake_checkpoint

RESNET_KWARGS = {"output_stride": 16, "channels": [32, 64, 128, 256]}  # tiny_cpu's network b


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of tiny_cpu whose weights differ from a seed-0 build (seed 1, BatchNorm statistics
    moved), and network a's export."""
    root = tmp_path_factory.mktemp("trained")
    cfg = load_config("tiny_cpu")
    torch.manual_seed(1)
    networks = {name: build_network(cfg, name) for name in cfg.networks}
    with torch.no_grad():
        for network in networks.values():
            network.train()(torch.randn(8, 3, 32, 32) * 2 + 1)
    write_fake_checkpoint(root, cfg, networks)
    export.export(root / "checkpoints", "a", root / "export_a")
    return root, networks


def start(overrides: list[str], name: str):
    """Student and teacher of network `name` as the Learner builds them (seed 0), with the recipe's init."""
    cfg = load_config("tiny_cpu", overrides)
    torch.manual_seed(0)
    initial = initial_weights(cfg, name)
    return build_student_and_teacher(cfg, name, pair_search_dim(cfg), torch.device("cpu"), 1, torch.float32, initial)


def test_init_from_an_export_gives_the_exported_features_at_step_0(trained):
    root, _ = trained
    student, teacher = start([f"networks.a.init={root / 'export_a'}"], "a")
    exported = timm.create_model(f"local-dir:{root / 'export_a'}", pretrained=True).eval()
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval().backbone(images).pooled, exported(images), rtol=0, atol=0)
        torch.testing.assert_close(student.eval().backbone(images).pooled, exported(images), rtol=0, atol=0)
    # The heads keep the random draws of a run without init: init changes the backbone only.
    fresh_student, _ = start([], "a")
    for key, value in fresh_student.state_dict().items():
        if not key.startswith("backbone."):
            assert torch.equal(student.state_dict()[key], value), key


def test_init_from_a_checkpoint_with_and_without_heads(trained):
    root, networks = trained
    saved = networks["b"].state_dict()
    student, teacher = start([f"networks.b.init={root}", "networks.b.init_heads=true"], "b")
    for network in (student, teacher):
        assert all(torch.equal(network.state_dict()[key], value) for key, value in saved.items())
    student, _ = start([f"networks.b.init={root / 'checkpoints' / 'step_00000005' / 'mokd_state.pt'}"], "b")
    state = student.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if k.startswith("backbone."))
    assert not torch.equal(state["search_head.position"], saved["search_head.position"])


def test_timm_state_dicts_with_a_wrapper_a_classifier_or_safetensors(trained, tmp_path):
    torch.manual_seed(2)
    with_classifier = timm.create_model("resnet18", num_classes=10, **RESNET_KWARGS)
    with_classifier.layer1[0].bn1.running_mean.add_(1.0)  # a buffer must come across too
    backbone = {k: v for k, v in with_classifier.state_dict().items() if not k.startswith("fc.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in with_classifier.state_dict().items()}, "epoch": 3},
               tmp_path / "r18.pth")
    save_file(backbone, str(tmp_path / "r18.safetensors"))
    for file, notes in (("r18.pth", 1), ("r18.safetensors", 0)):
        cfg = load_config("tiny_cpu", [f"networks.b.init={tmp_path / file}"])
        initial = initial_weights(cfg, "b")
        assert len(initial.notes) == notes and (not notes or "fc.weight, fc.bias" in initial.notes[0])
        student, teacher = start([f"networks.b.init={tmp_path / file}"], "b")
        for key, value in backbone.items():
            assert torch.equal(teacher.backbone.model.state_dict()[key], value), (file, key)


def init_error(overrides: list[str], name: str) -> str:
    with pytest.raises(ConfigError) as error:
        initial_weights(load_config("tiny_cpu", overrides), name)
    return str(error.value)


def test_mismatches_and_bad_paths_are_config_errors_naming_the_key(trained, tmp_path):
    root, _ = trained
    wrong_arch = init_error([f"networks.b.init={root / 'export_a'}"], "b")
    assert wrong_arch.startswith("networks.b.init: the weights of timm model folder")
    assert "126 of the network's 126 tensors missing (conv1.weight, bn1.weight" in wrong_arch
    assert "54 unexpected (" in wrong_arch and "records vit_tiny_patch16_224" in wrong_arch
    wider = init_error([f"networks.a.init={root / 'export_a'}", "networks.a.arch_kwargs.embed_dim=64"], "a")
    assert "of another shape (cls_token: weights (1, 1, 128), network (1, 1, 64)" in wider
    heads = init_error([f"networks.a.init={root}", "networks.a.init_heads=true", "mokd.out_dim=512"], "a")
    assert "4 of another shape (projection_head.last_layer.direction" in heads and "init_heads=false" in heads
    assert "does not exist" in init_error(["networks.a.init=/no/such/weights"], "a")
    assert "holds a backbone only" in init_error([f"networks.a.init={root / 'export_a'}",
                                                  "networks.a.init_heads=true"], "a")
    torch.save({"model": object()}, tmp_path / "pickled.pth")
    assert "cannot read" in init_error([f"networks.a.init={tmp_path / 'pickled.pth'}"], "a")
    (tmp_path / "empty").mkdir()
    assert "neither a timm model folder" in init_error([f"networks.a.init={tmp_path / 'empty'}"], "a")
    cohort = init_error(["networks.c.arch=resnet18", "networks.c.arch_kwargs={}", f"networks.c.init={root}"], "c")
    assert "holds networks ['a', 'b'], not 'c'" in cohort and "mokd-export" in cohort
    with pytest.raises(ConfigError, match="networks.a.init_heads needs networks.a.init"):
        load_config("tiny_cpu", ["networks.a.init_heads=true"])


def test_mokd_train_exits_2_before_any_process_group_on_a_wrong_architecture(trained, tmp_path):
    from mokd_scale.train import cli

    root, _ = trained
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        code = cli.main(["--config", "tiny_cpu", "--out", str(tmp_path / "run"),
                         "--set", f"networks.b.init={root / 'export_a'}"])
    assert code == 2 and "mokd-train: config error: networks.b.init: the weights of" in errors.getvalue()
    assert not (tmp_path / "run").exists()


def test_a_run_that_will_resume_does_not_read_init(tmp_path):
    cfg = load_config("tiny_cpu", ["networks.a.init=/gone", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="networks.a.init"):
        check_initial_weights(cfg, "auto")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000001\n")
    check_initial_weights(cfg, "auto")  # the checkpoint wins: init is not read
    with pytest.raises(ConfigError, match="networks.a.init"):
        check_initial_weights(cfg, "none")


# ----------------------------------------------- the real entry point: init, a step, a resume (one rank)
def init_then_resume(rank, world_size, export_dir, out):
    from tests.test_training import expect_codes

    common = [f"networks.a.init={export_dir}", f"output_dir={out}", "mokd.teacher_momentum=1.0",
              "mokd.teacher_momentum_end=1.0", "train.global_batch_size=8", "train.micro_batch_size=8",
              "data.samples_per_epoch=16", "mokd.search_depth=1", "train.checkpoint_every=1"]
    return expect_codes(rank, world_size, [(0, [*common, "train.steps=2", "train.stop_after_steps=1"], "none"),
                                           (0, [*common, "train.steps=2"], "auto")])


@pytest.mark.integration
def test_mokd_train_starts_from_an_export_and_a_resume_ignores_init(trained, tmp_path):
    from mokd_scale.train.checkpoint import read_state
    from mokd_scale.models.weights import backbone_state_dict
    from tests.dist_harness import run_on_ranks

    root, _ = trained
    first, resumed = run_on_ranks(init_then_resume, 1, args=(str(root / "export_a"), str(tmp_path)), timeout=300)
    assert "networks.a: student and teacher backbones start from timm model folder" in first
    assert "networks.b: " not in first  # b has no init
    assert resumed.count("networks.a.init ignored: resuming from step_00000001") == 1
    assert "start from" not in resumed
    # Teacher momentum 1: after a step the teacher is still exactly the export (a ViT has no BatchNorm).
    teacher = backbone_state_dict(read_state(tmp_path / "checkpoints" / "step_00000001")["teachers"]["a"])
    exported = timm.create_model(f"local-dir:{root / 'export_a'}", pretrained=True).state_dict()
    assert teacher.keys() == exported.keys() and all(torch.equal(teacher[k], exported[k]) for k in exported)
