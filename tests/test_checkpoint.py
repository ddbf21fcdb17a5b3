"""Checkpoint manifests and the choice of what to resume, on hand-made tags (no training).
The save and resume paths end to end are in tests/test_training.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mokd_scale.train import checkpoint
from mokd_scale.runtime import faults
from mokd_scale.train import manifest


def make_tag(checkpoints: Path, step: int, with_manifest: bool = True) -> Path:
    """A tag in the real layout, small: an engine file, the state file, a rank file."""
    tag_dir = checkpoints / checkpoint.tag_for(step)
    (tag_dir / "a").mkdir(parents=True)
    (tag_dir / "a" / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 40)
    torch.save({"step": step, "teachers": {"a": {"w": torch.full((3,), float(step))}}}, tag_dir / "mokd_state.pt")
    torch.save({"rng": None}, tag_dir / "rank0.pt")
    if with_manifest:
        digests = {name: manifest.sha256_of(tag_dir / name) for name in ("mokd_state.pt", "rank0.pt")}
        manifest.write_manifest(tag_dir, step, manifest.list_files(tag_dir), digests)
    return tag_dir


def truncate(path: Path, size: int = 100) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def test_verify_names_a_missing_a_truncated_and_a_changed_file(tmp_path):
    tag_dir = make_tag(tmp_path, 2)
    assert manifest.verify(tag_dir) == []
    (tag_dir / "a_universal").mkdir()  # files added after the save are allowed
    (tag_dir / "a_universal" / "x").write_text("later")
    assert manifest.verify(tag_dir) == []
    truncate(tag_dir / "a" / "mp_rank_00_model_states.pt")
    (tag_dir / "rank0.pt").unlink()
    state = bytearray((tag_dir / "mokd_state.pt").read_bytes())
    state[-30] ^= 0xFF  # same size, other content
    (tag_dir / "mokd_state.pt").write_bytes(bytes(state))
    problems = manifest.verify(tag_dir)
    assert "a/mp_rank_00_model_states.pt has 100 bytes, 10240 when written (truncated or replaced)" in problems
    assert "rank0.pt is missing" in problems
    assert "mokd_state.pt does not match its checksum (changed since it was written)" in problems
    (tag_dir / manifest.MANIFEST).unlink()
    assert "no manifest.json" in manifest.verify(tag_dir)[0]


def test_a_damaged_latest_falls_back_to_the_newest_intact_tag_before_it(tmp_path):
    for step in (2, 4, 6, 8):
        make_tag(tmp_path, step)
    checkpoint.write_latest(tmp_path, "step_00000006")  # step 8: a save that never moved `latest`
    truncate(tmp_path / "step_00000006" / "a" / "mp_rank_00_model_states.pt")
    (tmp_path / "step_00000004" / "mokd_state.pt").unlink()
    chosen, warnings = checkpoint.choose_resume("auto", tmp_path)
    assert chosen == tmp_path / "step_00000002"
    assert any(w.startswith("checkpoint step_00000006 is not usable: a/mp_rank_00_model_states.pt has 100 bytes")
               for w in warnings), warnings
    assert "checkpoint step_00000004 is not usable: mokd_state.pt is missing" in warnings
    assert "resuming from step_00000002, the newest intact checkpoint before step_00000006" in warnings
    assert checkpoint.choose_resume("auto", tmp_path / "nothing_here") == (None, [])
    assert checkpoint.choose_resume("none", tmp_path) == (None, [])


def test_no_intact_checkpoint_refuses_to_start_over(tmp_path):
    for step in (2, 4):
        truncate(make_tag(tmp_path, step) / "mokd_state.pt")
    checkpoint.write_latest(tmp_path, "step_00000004")
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpoint.choose_resume("auto", tmp_path)
    message = str(error.value)
    assert "no usable checkpoint" in message and "step_00000002" in message and "step_00000004" in message
    assert "--resume none" in message and "Nothing was changed" in message


def test_latest_naming_a_missing_tag_is_reported(tmp_path):
    make_tag(tmp_path, 2)
    checkpoint.write_latest(tmp_path, "step_00000004")
    chosen, warnings = checkpoint.choose_resume("auto", tmp_path)
    assert chosen == tmp_path / "step_00000002" and "latest names step_00000004, which does not exist" in warnings


def test_an_interrupted_first_save_starts_fresh_and_says_so(tmp_path):
    make_tag(tmp_path, 2, with_manifest=False)  # killed before its manifest; `latest` never written
    chosen, warnings = checkpoint.choose_resume("auto", tmp_path)
    assert chosen is None
    assert warnings[-1] == "no checkpoint was completed here yet: starting from scratch"


def test_an_explicit_tag_is_checked_too(tmp_path):
    unverifiable = make_tag(tmp_path, 2, with_manifest=False)
    chosen, warnings = checkpoint.choose_resume(str(unverifiable), tmp_path)
    assert chosen == unverifiable and "cannot be checked" in warnings[0]
    damaged = make_tag(tmp_path, 4)
    truncate(damaged / "rank0.pt", 10)
    with pytest.raises(checkpoint.CheckpointError, match="is damaged: rank0.pt has 10 bytes"):
        checkpoint.choose_resume(str(damaged), tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="neither a checkpoint tag folder"):
        checkpoint.choose_resume(str(tmp_path / "missing"), tmp_path)


def test_prune_counts_complete_tags_only_and_keeps_latest(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)
    make_tag(tmp_path, 4, with_manifest=False)  # a save in progress, newer than every complete tag
    make_tag(tmp_path, 0, with_manifest=False)  # an old crashed save
    checkpoint.write_latest(tmp_path, "step_00000001")
    checkpoint.prune(tmp_path, keep_last=1)
    assert checkpoint.tags_in(tmp_path) == ["step_00000001", "step_00000003", "step_00000004"]


def test_find_tag_for_tools(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (2, 4):
        make_tag(checkpoints, step)
    checkpoint.write_latest(checkpoints, "step_00000004")
    assert checkpoint.find_tag(tmp_path / "run") == checkpoints / "step_00000004"
    assert checkpoint.find_tag(checkpoints, "2") == checkpoints / "step_00000002"
    assert checkpoint.find_tag(checkpoints / "step_00000002") == checkpoints / "step_00000002"
    assert checkpoint.teacher_weights(checkpoints / "step_00000002", "a")["w"].tolist() == [2.0] * 3
    with pytest.raises(checkpoint.CheckpointError, match="unknown network 'c'"):
        checkpoint.teacher_weights(checkpoints / "step_00000002", "c")
    with pytest.raises(checkpoint.CheckpointError, match="available tags"):
        checkpoint.find_tag(checkpoints, "step_00000007")
    truncate(checkpoints / "step_00000004" / "mokd_state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="is damaged: mokd_state.pt has 100 bytes"):
        checkpoint.find_tag(checkpoints)


def test_fault_specs_parse_and_bad_ones_are_refused(monkeypatch):
    assert faults.parse("nan@3:1, crash@5") == [("nan", 3, 1), ("crash", 5, None)]
    for bad in ("nan", "nan@x", "melt@3", "crash@3:one"):
        with pytest.raises(ValueError, match="MOKD_FAULTS"):
            faults.parse(bad)
    monkeypatch.setenv(faults.VARIABLE, "crash@5:0,save_error@2")
    assert faults.armed("crash", 5) and faults.armed("save_error", 2)
    assert not faults.armed("crash", 4) and not faults.armed("nan", 5)
    with pytest.raises(faults.InjectedFault):
        faults.step_starts(5)
    monkeypatch.setenv(faults.VARIABLE, "crash@5:1")  # another rank's fault
    faults.step_starts(5)
