"""A cohort of three networks (tiny ViT, slim ResNet, slim ConvNeXt: the tiny_cpu_cohort recipe) trains on 2
ranks, checkpoints, resumes equal to a straight run, is evaluated by k-NN and exports each network; its
metrics name every term of every network, KoLeo included when weighted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.dist_harness import run_on_ranks
from tests.test_training import REPO, metrics, photo_shards, teacher_weights  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

COHORT = ["data.source=synthetic", "train.global_batch_size=8", "train.micro_batch_size=4",
          "data.samples_per_epoch=80", "train.log_every=1", "train.checkpoint_every=1000", "mokd.out_dim=128",
          "data.synthetic_image_size=36", "data.workers=0", "train.steps=3", "mokd.term_weights={koleo: 0.1}"]
TERMS = ("self_proj", "self_search", "cross_proj", "cross_search", "koleo", "loss")


def train_cohort(rank, world_size, straight, sliced):
    import contextlib
    import io

    from mokd_scale.train import main
    outputs = []
    for overrides in ([f"output_dir={straight}"], ["train.stop_after_steps=1", f"output_dir={sliced}"],
                      [f"output_dir={sliced}"]):
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            code = main(["--config", "tiny_cpu_cohort", "--set", *COHORT, *overrides])
        assert code == 0, output.getvalue()
        outputs.append(output.getvalue())
    return outputs


def test_three_networks_train_resume_evaluate_and_export(tmp_path, photo_shards):  # noqa: F811
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    outputs = run_on_ranks(train_cohort, 2, (straight, sliced), timeout=600)
    assert "resumed from step_00000001" in outputs[2]
    rows, resumed = metrics(straight), metrics(sliced)
    keys = [f"{n}.{t}" for n in "abc" for t in TERMS]
    assert all(key in rows[-1] for key in keys), sorted(set(keys) - set(rows[-1]))
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for left, right in zip(rows, resumed):
        for key in keys:
            assert right[key] == pytest.approx(left[key], rel=1e-6, abs=1e-7), (left["step"], key)
    straight_teachers, sliced_teachers = teacher_weights(straight), teacher_weights(sliced)
    assert sorted(straight_teachers) == ["a", "b", "c"]
    for name in "abc":
        for key, value in straight_teachers[name].items():
            torch.testing.assert_close(sliced_teachers[name][key], value, rtol=0, atol=0, msg=f"{name} {key}")

    knn = subprocess.run([sys.executable, "-m", "mokd_scale.tools.eval_knn", "--checkpoint",
                          str(straight / "checkpoints"), "--train-shards", str(photo_shards), "--val-shards",
                          str(photo_shards), "--set", "data.eval_resize=32", "data.eval_crop=32"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert knn.returncode == 0, knn.stderr[-2000:]
    result = json.loads(knn.stdout.strip().splitlines()[-1])
    assert all(0 <= result[n]["top1"] <= 100 for n in "abc")

    from mokd_scale.tools import export
    for name in "abc":
        export.export(straight / "checkpoints", name, tmp_path / f"export_{name}")
        assert (tmp_path / f"export_{name}" / "model.safetensors").is_file()
