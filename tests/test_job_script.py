"""The job script's decisions after its training step ends, without Slurm: the script is sourced and
handle_step_end runs with a recording `scontrol`. The real thing, on a two-node Slurm cluster, is in
tests/test_slurm.py."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLAGSHIP = REPO / "slurm" / "mokd_vitl_r152.sh"
JOB_ID = "4242"


def step_end(tmp_path: Path, status: int, latest: str | None = None, record: str | None = None,
             max_restarts: str | None = None, warned: bool = False, terminated: bool = False) -> tuple[int, str, str]:
    """Run handle_step_end STATUS for job JOB_ID; returns (exit code, log, scontrol calls)."""
    run_dir = tmp_path / "runs" / "job"
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    if latest:
        (run_dir / "checkpoints" / "latest").write_text(latest + "\n")
    if record is not None:
        (run_dir / ".slurm_restarts").write_text(record + "\n")
    calls = tmp_path / "scontrol_calls"
    calls.write_text("")
    script = (f"source '{FLAGSHIP}'\n"
              f"scontrol() {{ echo \"$*\" >>'{calls}'; }}\n"
              "configure\n"
              f"warned={int(warned)}; terminated={int(terminated)}\n"
              f"handle_step_end {status}\n")
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "job",
           "MOKD_OUTPUT_ROOT": str(tmp_path / "runs")}
    if max_restarts is not None:
        env["MOKD_MAX_RESTARTS"] = max_restarts
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=30)
    return result.returncode, result.stdout + result.stderr, calls.read_text()


def restart_record(tmp_path: Path) -> str:
    return (tmp_path / "runs" / "job" / ".slurm_restarts").read_text().strip()


def test_a_killed_rank_requeues_and_records_the_checkpoint(tmp_path):
    code, log, calls = step_end(tmp_path, 137, latest="step_00000004")
    assert code == 0 and calls.strip() == f"requeue {JOB_ID}", log
    assert "restart 1 of 3 after: a rank was killed by SIGKILL" in log
    assert "resumes from step_00000004" in log
    assert restart_record(tmp_path) == f"{JOB_ID} 1 step_00000004"


def test_a_restart_that_made_progress_restarts_again(tmp_path):
    code, log, calls = step_end(tmp_path, 1, latest="step_00000008", record=f"{JOB_ID} 1 step_00000004")
    assert calls.strip() == f"requeue {JOB_ID}" and "restart 2 of 3" in log, log
    assert "exit code 1" in log
    assert restart_record(tmp_path) == f"{JOB_ID} 2 step_00000008"


def test_no_progress_since_the_last_restart_stops(tmp_path):
    code, log, calls = step_end(tmp_path, 1, latest="step_00000004", record=f"{JOB_ID} 1 step_00000004")
    assert code == 1 and calls == "", log
    assert "No progress since restart 1" in log and "step_00000004" in log
    assert restart_record(tmp_path) == f"{JOB_ID} 1 step_00000004"  # unchanged


def test_no_checkpoint_yet_and_no_progress_stops_too(tmp_path):
    first = step_end(tmp_path, 137)
    assert first[2].strip() == f"requeue {JOB_ID}" and "resumes from none" in first[1]
    code, log, calls = step_end(tmp_path, 137)
    assert calls == "" and "No progress since restart 1" in log, log


def test_the_restart_limit_stops(tmp_path):
    code, log, calls = step_end(tmp_path, 137, latest="step_00000012", record=f"{JOB_ID} 3 step_00000008")
    assert code == 137 and calls == "", log
    assert "Restart limit reached (3 of MOKD_MAX_RESTARTS=3)" in log
    code, log, calls = step_end(tmp_path, 137, latest="step_00000012", record=f"{JOB_ID} 1 step_00000008",
                                max_restarts="1")
    assert calls == "" and "(1 of MOKD_MAX_RESTARTS=1)" in log, log


def test_a_new_job_counts_afresh(tmp_path):
    """A resubmission (another job id) of a run that had used up its restarts."""
    code, log, calls = step_end(tmp_path, 137, latest="step_00000012", record="4141 3 step_00000012")
    assert calls.strip() == f"requeue {JOB_ID}" and "restart 1 of 3" in log, log


@pytest.mark.parametrize("status", [2, 3, 4, 74])
def test_deliberate_stops_are_not_restarted(tmp_path, status):
    code, log, calls = step_end(tmp_path, status, latest="step_00000004")
    assert code == status and calls == "" and "not restarting" in log, log
    assert not (tmp_path / "runs" / "job" / ".slurm_restarts").exists()


def test_scancel_is_never_undone(tmp_path):
    for status in (75, 1, 137):
        code, log, calls = step_end(tmp_path, status, latest="step_00000004", terminated=True)
        assert code == status and calls == "" and "not requeueing" in log, (status, log)


def test_preemption_requeues_without_counting_a_restart(tmp_path):
    code, log, calls = step_end(tmp_path, 75, latest="step_00000006", record=f"{JOB_ID} 2 step_00000004",
                                warned=True)
    assert code == 0 and calls.strip() == f"requeue {JOB_ID}", log
    assert "checkpoint saved; requeueing" in log
    assert restart_record(tmp_path) == f"{JOB_ID} 2 step_00000004"


def test_success_ends_the_job(tmp_path):
    code, log, calls = step_end(tmp_path, 0, latest="step_00000006")
    assert code == 0 and calls == "", log


def test_bad_restart_limit_is_refused(tmp_path):
    code, log, _ = step_end(tmp_path, 137, max_restarts="three")
    assert code == 2 and "MOKD_MAX_RESTARTS=three" in log
