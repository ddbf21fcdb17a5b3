"""Export round trip: a checkpoint in the layout of mokd_scale/checkpoint.py -> timm model folder ->
timm.create_model("local-dir:...") -> the same pooled features as the training network's backbone."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mokd_scale.config import load_config, to_dict
from mokd_scale.models import build_network, pair_search_dim
from mokd_scale.tools import export as export_backbone


@pytest.fixture(scope="module")
def tiny_networks():
    cfg = load_config("tiny_cpu")
    torch.manual_seed(0)
    networks = {name: build_network(cfg, name) for name in ("a", "b")}
    with torch.no_grad():  # move BatchNorm running stats away from their init values
        for net in networks.values():
            net.train()(torch.randn(8, 3, 32, 32) * 2 + 1)
            net.eval()
    return cfg, networks


def write_fake_checkpoint(root: Path, cfg, networks, step=5, latest=True):
    step_dir = root / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    state = {"step": step, "teachers": {k: n.state_dict() for k, n in networks.items()},
             "centers": {}, "config": to_dict(cfg), "data": {}}
    torch.save(state, step_dir / "mokd_state.pt")
    if latest:
        (root / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return step_dir


def load_export(folder: Path):
    """The one line the export promises."""
    import timm
    return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()


@pytest.mark.parametrize("network", ["a", "b"])
def test_exported_teacher_loads_in_one_timm_line_and_gives_training_features(tmp_path, tiny_networks, network):
    import timm

    cfg, networks = tiny_networks
    write_fake_checkpoint(tmp_path, cfg, networks)
    out = tmp_path / network
    assert export_backbone.main(["--checkpoint", str(tmp_path / "checkpoints"), "--network", network,
                                 "--out", str(out)]) == 0
    model = load_export(out)
    images = torch.randn(4, 3, cfg.data.eval_crop, cfg.data.eval_crop)  # the size the export records
    with torch.no_grad():
        torch.testing.assert_close(model(images), networks[network].backbone(images).pooled)
        if network == "a":  # other sizes run too; timm resizes positions its own way there (see export.py)
            assert model(images[:, :, :16, :16]).shape == (4, model.num_features)
    assert model.num_classes == 0
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, cfg.data.eval_crop, cfg.data.eval_crop)
    assert tuple(data["mean"]) == cfg.data.mean and tuple(data["std"]) == cfg.data.std
    assert data["crop_pct"] == cfg.data.eval_crop / cfg.data.eval_resize
    saved = json.loads((out / "config.json").read_text())
    assert saved["architecture"] == getattr(cfg.networks, network).arch
    assert saved["mokd"]["step"] == 5 and saved["mokd"]["weights"] == "teacher"
    assert "tag" not in saved["pretrained_cfg"]  # not the published weights timm's registry names
    assert all(t.dtype != torch.bfloat16 for t in load_file(str(out / "model.safetensors")).values())


def test_student_export_from_stage0_engine_save(tmp_path, tiny_networks):
    cfg, networks = tiny_networks
    step_dir = write_fake_checkpoint(tmp_path, cfg, networks)
    student = build_network(cfg, "b")  # differs from teacher
    (step_dir / "b").mkdir()
    torch.save({"module": student.state_dict()}, step_dir / "b" / "mp_rank_00_model_states.pt")
    export_backbone.export(tmp_path / "checkpoints", "b", tmp_path / "student", student=True)
    exported = load_export(tmp_path / "student").state_dict()
    for key, value in student.backbone.model.state_dict().items():
        assert torch.equal(exported[key], value), key


def test_explicit_tag_and_step_number(tmp_path, tiny_networks):
    cfg, networks = tiny_networks
    write_fake_checkpoint(tmp_path, cfg, networks, step=3, latest=False)
    for tag in ("step_00000003", "3"):
        summary = export_backbone.export(tmp_path / "checkpoints", "a", tmp_path / tag, tag=tag)
        assert summary["step"] == 3 and summary["timm_kwargs"]["patch_size"] == 4
        assert summary["timm"] == f"timm.create_model('local-dir:{tmp_path / tag}', pretrained=True)"


def test_clear_errors(tmp_path, tiny_networks, capsys):
    cfg, networks = tiny_networks
    out = tmp_path / "out"

    def export(*args: str) -> str:
        assert export_backbone.main(["--checkpoint", str(tmp_path / "checkpoints"), *args]) == 2
        return capsys.readouterr().err

    assert "does not exist" in export("--network", "a", "--out", str(out))
    write_fake_checkpoint(tmp_path, cfg, networks, latest=False)
    err = export("--network", "a", "--out", str(out))
    assert "no 'latest' file" in err and "step_00000005" in err  # names the tags that exist
    assert "step_00000007" in export("--tag", "7", "--network", "a", "--out", str(out))
    assert "unknown network 'c'" in export("--tag", "5", "--network", "c", "--out", str(out))
    assert "e.g. --out exports/vit\n" in export("--tag", "5", "--network", "a", "--out", "exports/vit.safetensors")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert "already holds other files (notes.txt)" in export("--tag", "5", "--network", "a", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ------------------------------------------- --student from real DeepSpeed ZeRO-3 / ZeRO-2 saves
def train_one_step_and_save(rank, world_size, out_dir):
    """Network a in a ZeRO-3 engine, b in ZeRO-2; one optimizer step; a checkpoint in our layout."""
    import deepspeed
    from mokd_scale.engine.learner import Learner
    from mokd_scale.train import checkpoint
    from mokd_scale.train.schedules import NetworkValues, StepValues
    from mokd_scale.train.state import Progress, run_state

    cfg = load_config("tiny_cpu", ["networks.a.deepspeed=ds_configs/zero3_bf16.json",
                                   "networks.b.deepspeed=ds_configs/zero2_bf16.json",
                                   "train.global_batch_size=8", "train.micro_batch_size=4",
                                   "mokd.out_dim=64", "mokd.proj_hidden_dim=32", "mokd.proj_bottleneck_dim=16",
                                   "mokd.search_depth=1"])
    torch.manual_seed(0)
    learners = {name: Learner(name, cfg, pair_search_dim(cfg), torch.device("cpu"), world_size)
                for name in ("a", "b")}
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    values = StepValues(0.99, False, {name: NetworkValues(1e-2, 0.0, 0.04) for name in "ab"})
    for name, learner in learners.items():
        learner.begin_step(values)
        loss = learner.engine(images).proj.float().pow(2).mean()
        learner.engine.backward(loss)
        learner.engine.step()
    state = run_state(learners, loader=None, progress=Progress(1))
    checkpoint.save_checkpoint(Path(out_dir), 1, state, {"config": to_dict(cfg)}, keep_last=1)
    students = {}
    for name, learner in learners.items():
        backbone = learner.student.backbone.model
        with deepspeed.zero.GatheredParameters(list(backbone.parameters()), modifier_rank=None,
                                               enabled=learner.zero_stage == 3):
            students[name] = {k: v.detach().clone().numpy() for k, v in backbone.state_dict().items()}
    return students


@pytest.mark.integration
def test_student_export_from_real_zero3_and_zero2_checkpoints(tmp_path):
    from tests.dist_harness import run_on_ranks

    students = run_on_ranks(train_one_step_and_save, 2, args=(str(tmp_path / "checkpoints"),), timeout=240)
    assert (tmp_path / "checkpoints" / "step_00000001" / "a" / "zero_pp_rank_1_mp_rank_00_model_states.pt").exists()
    for name in ("a", "b"):
        student_dir, teacher_dir = tmp_path / f"{name}_student", tmp_path / f"{name}_teacher"
        export_backbone.export(tmp_path / "checkpoints", name, student_dir, student=True)
        export_backbone.export(tmp_path / "checkpoints", name, teacher_dir)
        student, teacher = load_file(str(student_dir / "model.safetensors")), load_file(str(teacher_dir / "model.safetensors"))
        assert set(student) == set(students[name])
        for key, value in students[name].items():
            torch.testing.assert_close(student[key], torch.from_numpy(value), msg=f"{name}: {key}")
        # The step moved the student; the teacher (EMA, not updated here) still holds the init.
        assert any(not torch.equal(student[k], teacher[k]) for k in student if k.endswith("weight"))


def test_eval_tools_load_the_students_with_student(tmp_path, tiny_networks):
    """--student: the DeepSpeed save of each student (ZeRO-0's model-states file), not the EMA teachers."""
    import argparse

    from mokd_scale.tools.eval_knn import add_checkpoint_arguments, load_teachers

    cfg, networks = tiny_networks
    step_dir = write_fake_checkpoint(tmp_path, cfg, networks)
    students = {}
    for name, network in networks.items():
        students[name] = {k: v + 1.0 if v.is_floating_point() else v for k, v in network.state_dict().items()}
        (step_dir / name).mkdir()
        torch.save({"module": students[name]}, step_dir / name / "mp_rank_00_model_states.pt")
    parser = argparse.ArgumentParser()
    add_checkpoint_arguments(parser)
    for flag, expected in (([], {n: net.state_dict() for n, net in networks.items()}), (["--student"], students)):
        _, loaded, info = load_teachers(parser.parse_args(["--checkpoint", str(tmp_path / "checkpoints"), *flag]),
                                        torch.device("cpu"))
        assert info["weights"] == ("student" if flag else "teacher")
        for name, network in loaded.items():
            for key, value in network.state_dict().items():
                assert torch.equal(value, expected[name][key]), (flag, name, key)
