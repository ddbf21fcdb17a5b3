"""The restructurings keep every number: fixed-seed runs give the per-step losses recorded before
the method became data (tests/fixtures/numbers.json, written by tests/fixtures/record_numbers.py
through the command line), and a checkpoint written by that version resumes to the losses its own
straight run logged."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.fixtures import record_numbers as recorded


def assert_same_losses(expected: list[dict], got: list[dict], what: str) -> None:
    assert [row["step"] for row in got] == [row["step"] for row in expected], what
    for want, have in zip(expected, got):
        assert set(have) >= set(want), f"{what}: keys {sorted(set(want) - set(have))} missing"
        for key, value in want.items():
            assert have[key] == pytest.approx(value, rel=1e-6, abs=1e-7), f"{what}, step {want['step']}, {key}"


@pytest.mark.parametrize("run", sorted(recorded.RUNS))
def test_fixed_seed_runs_give_the_recorded_losses(tmp_path, run):
    expected = json.loads(recorded.NUMBERS.read_text())["losses"][run]
    assert_same_losses(expected, recorded.run_recorded(run, tmp_path), run)


def test_a_checkpoint_of_the_previous_version_resumes(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(recorded.V1_CHECKPOINT / "step_00000002", out / "checkpoints" / "step_00000002")
    (out / "checkpoints" / "latest").write_text("step_00000002\n")
    assert recorded.train([*recorded.COMMON, *recorded.SMALL, f"output_dir={out}"], resume="auto") == 0
    expected = json.loads((recorded.V1_CHECKPOINT / "losses.json").read_text())
    assert_same_losses(expected, recorded.losses(out), "resumed from the v1 checkpoint")
