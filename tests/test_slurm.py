"""slurm/mokd_vitl_r152.sh on a real Slurm cluster: two emulated nodes on this machine.

The module fixture runs tests/slurm/cluster_up.sh (installs Slurm from Debian when missing) and
tests/slurm/cluster_down.sh at the end. Where Slurm cannot be installed (not root, no apt) the
tests are skipped with the reason, except in CI (CI=true), where that is a failure.
The flagship script is submitted with command-line options that override its 4-node GPU header
and with environment overrides for the tiny CPU recipe.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_training import photo_shards  # noqa: F401 - a fixture: the ImageNet-shaped shards

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
CLUSTER_UP = REPO / "tests" / "slurm" / "cluster_up.sh"
CLUSTER_DOWN = REPO / "tests" / "slurm" / "cluster_down.sh"
FLAGSHIP = REPO / "slurm" / "mokd_vitl_r152.sh"
STATE = Path(os.environ.get("MOKD_SLURM_STATE", "/tmp/mokd-slurm"))
CANNOT_INSTALL = 3  # cluster_up.sh's exit code when Slurm cannot be installed on this machine

# Two CPU "nodes", one rank each: command-line options win over the script's #SBATCH header.
TWO_CPU_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
# The tiny recipe shrunk further so a step takes a fraction of a second on a shared 2-core machine.
TINY = "data.source=synthetic train.global_batch_size=16 train.micro_batch_size=8 train.log_every=1 train.knn_every=0"
# Variables of an enclosing launcher would override Slurm's in mokd_scale.runtime.dist or confuse sbatch.
FOREIGN_LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def slurm_cluster():
    # One test session at a time on this machine's cluster: another session's teardown would stop
    # the daemons (and cancel the jobs) under this one.
    with open(f"{STATE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from cluster_up_and_down()


def cluster_up_and_down():
    started = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_UP)], capture_output=True, text=True, timeout=900)
    tail = (up.stdout + up.stderr)[-2000:]
    if up.returncode != 0:  # stop whatever daemons did start before it failed
        subprocess.run(["bash", str(CLUSTER_DOWN)], capture_output=True, text=True, timeout=120)
    if up.returncode == CANNOT_INSTALL and not in_ci():
        pytest.skip(f"Slurm cannot be installed on this machine (cluster_up.sh exit 3):\n{tail}")
    if up.returncode != 0:
        pytest.fail(f"cluster_up.sh failed with exit code {up.returncode}:\n{tail}")
    print(f"slurm cluster up in {time.monotonic() - started:.1f} s")
    yield STATE
    subprocess.run(["bash", str(CLUSTER_DOWN)], capture_output=True, text=True, timeout=120)


# --- helpers ---------------------------------------------------------------------------------

def job_environment(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in FOREIGN_LAUNCH_VARIABLES and not key.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(overrides)
    return env


def write_env_script(directory: Path) -> Path:
    """The MOKD_ENV file a user would write: activate the repo's virtual environment.

    It keeps the `ninja` this test process finds: DeepSpeed JIT-builds its CPU ops with the first
    ninja on PATH, and Debian's ninja 1.11 and the venv's pip ninja 1.13 log different command
    hashes, so a job with the other one rebuilds the shared op cache (1-2 min on 2 cores) every time."""
    lines = [f"source '{REPO / '.venv' / 'bin' / 'activate'}'",
             f"export TORCH_EXTENSIONS_DIR=\"${{TORCH_EXTENSIONS_DIR:-{REPO / '.cache' / 'torch_extensions'}}}\"",
             "export OMP_NUM_THREADS=1"]
    ninja = shutil.which("ninja")
    if ninja:
        pinned = directory / "ninja_bin"
        pinned.mkdir()
        (pinned / "ninja").symlink_to(ninja)
        lines.append(f"export PATH='{pinned}':\"$PATH\"")
    script = directory / "mokd_env.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


def flagship_environment(tmp_path: Path, overrides: str) -> dict[str, str]:
    return job_environment(
        MOKD_ENV=str(write_env_script(tmp_path)),
        MOKD_RECIPE="tiny_cpu",
        MOKD_OUTPUT_ROOT=str(tmp_path / "runs"),
        MOKD_OVERRIDES=overrides,
    )


def sbatch(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    """Submit with --parsable; returns (exit code of sbatch, job id). With --wait, sbatch's exit code
    is the job's; a job still running after `timeout` is cancelled so later tests get the nodes."""
    process = subprocess.Popen(["sbatch", "--parsable", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=cwd)
    job_id = process.stdout.readline().strip().split(";")[0]  # printed at submission, before --wait waits
    try:
        _, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        scancel(job_id)
        process.kill()
        process.communicate()
        pytest.fail(f"job {job_id} did not finish in {timeout:.0f} s; cancelled. Logs: {cwd}")
    assert job_id, f"sbatch printed no job id (exit {process.returncode}): {errors}"
    return process.returncode, job_id


def job_listed(job_id: str) -> bool:
    result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def wait_until_gone(job_id: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while job_listed(job_id):
        assert time.monotonic() < deadline, f"job {job_id} still in the queue after {timeout:.0f} s"
        time.sleep(1)


def completion_records(job_id: str) -> list[dict[str, str]]:
    """The job's lines in jobcomp/filetxt's log (one per run: requeued runs log too)."""
    log = STATE / "jobcomp.log"
    records = []
    for line in log.read_text().splitlines() if log.exists() else []:
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("JobId") == job_id:
            records.append(fields)
    return records


def final_record(job_id: str, timeout: float = 15) -> dict[str, str]:
    """slurmctld appends the record as the job ends; give it a moment to arrive."""
    deadline = time.monotonic() + timeout
    while True:
        records = [r for r in completion_records(job_id) if r.get("JobState") != "PENDING"]
        if records or time.monotonic() > deadline:
            assert records, f"no completion record for job {job_id} in {STATE / 'jobcomp.log'}"
            return records[-1]
        time.sleep(0.5)


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    assert path.exists(), f"{path} missing; files: {sorted(p.name for p in run_dir.iterdir())}"
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def logged_steps(metrics: Path) -> list[int]:
    """Steps in a metrics.jsonl that may be half-written right now (the last line can be partial)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            steps.append(json.loads(line)["step"])
        except ValueError:
            pass
    return steps


def latest_tag(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "latest"
    assert latest.exists(), f"{latest} missing"
    tag = latest.read_text().strip()
    assert (run_dir / "checkpoints" / tag).is_dir(), f"latest names {tag}, which is not a directory"
    return tag


def read_log(path: Path) -> str:
    assert path.exists(), f"job log {path} missing"
    return path.read_text(errors="replace")


def scancel(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True)


# --- tests -----------------------------------------------------------------------------------

def test_nodelist_fallback_agrees_with_scontrol(slurm_cluster):
    from mokd_scale.runtime.dist import expand_nodelist

    for nodelist in ("gpu[001-003,010],cpu7", "n1", "a[1-2]-ib[0-1]", "node[9-11]", "x[08-10],y[1,3-4]"):
        expanded = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                  check=True).stdout.split()
        assert expand_nodelist(nodelist) == expanded, nodelist


def test_trivial_two_node_job(slurm_cluster, tmp_path):
    code, job_id = sbatch(
        ["--wait", "--nodes=2", "--ntasks-per-node=1", f"--output={tmp_path}/%x-%j.out", "--job-name=hello",
         "--wrap", "srun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS on $SLURMD_NODENAME'"],
        job_environment(), tmp_path, timeout=60)
    log = read_log(tmp_path / f"hello-{job_id}.out")
    assert code == 0, log
    assert "task 0 of 2 on n1" in log and "task 1 of 2 on n2" in log, log
    assert final_record(job_id)["JobState"] == "COMPLETED"


def test_flagship_script_trains_on_two_nodes(slurm_cluster, tmp_path):
    env = flagship_environment(tmp_path, f"{TINY} train.steps=4 train.checkpoint_every=2")
    code, job_id = sbatch(
        [*TWO_CPU_NODES, "--wait", "--job-name=mokd_two_nodes", f"--output={tmp_path}/%x-%j.out", str(FLAGSHIP)],
        env, tmp_path, timeout=420)
    log = read_log(tmp_path / f"mokd_two_nodes-{job_id}.out")
    assert code == 0, log
    assert "mokd-slurm: nodes     2: n[1-2]" in log, log
    assert "restart_count=0" in log, log
    # srun --label prefixes each line with the Slurm task id; the rank must be that task id.
    assert re.search(r"^0: .*mokd-train rank 0/2 ready", log, re.M), log
    assert re.search(r"^1: .*mokd-train rank 1/2 ready", log, re.M), log
    run_dir = tmp_path / "runs" / "mokd_two_nodes"  # output folder named after the job
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert latest_tag(run_dir) == "step_00000004"
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()  # checkpoint_every=2 kept with keep_last=2
    assert final_record(job_id)["JobState"] == "COMPLETED"


def test_preempted_job_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """Rank 1 writes its part of every checkpoint seconds late (a slow disk): srun ends all ranks when
    the first exits with 75, so the resume from the preemption checkpoint shows that no rank left
    before every rank's files were written."""
    steps = 12
    env = flagship_environment(tmp_path, f"{TINY} train.steps={steps} train.checkpoint_every=1000")
    env["MOKD_FAULTS"] = ",".join(f"slow_save@{step}:1" for step in range(1, steps))  # not the final save
    _, job_id = sbatch([*TWO_CPU_NODES, "--job-name=mokd_preempt", f"--output={tmp_path}/%x-%j.out", str(FLAGSHIP)],
                       env, tmp_path, timeout=30)
    run_dir = tmp_path / "runs" / "mokd_preempt"
    log_path = tmp_path / f"mokd_preempt-{job_id}.out"
    try:
        wait_for_training(job_id, run_dir, log_path, min_step=2, timeout=300)
        # What --signal=B:USR1@N does before the time limit: USR1 to the batch shell only.
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
        wait_until_gone(job_id, timeout=240)
    finally:
        scancel(job_id)
    log = read_log(log_path)
    assert "received USR1" in log, log
    saved = re.findall(r"preempted: checkpoint (step_\d+) saved", log)
    assert len(saved) == 2 and saved[0] == saved[1], f"both ranks should save the same checkpoint:\n{log}"
    assert "restart_count=1" in log, f"the job was not requeued:\n{log}"
    assert re.search(rf"resumed from {saved[0]}\b", log), log
    preempted_at = int(saved[0].removeprefix("step_"))
    assert 2 <= preempted_at < steps
    assert "is not usable" not in log  # the checkpoint was whole: rank 1's late files included
    # Every step logged exactly once: the second run continues where the first stopped.
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    assert latest_tag(run_dir) == f"step_{steps:08d}"
    record = final_record(job_id)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record


def test_scancel_stops_the_job_without_requeue(slurm_cluster, tmp_path):
    """A user's scancel (SIGTERM) must end the job: the trainer saves and exits 75, but the script
    must not requeue, or no job could ever be cancelled. A stand-in trainer keeps this test fast."""
    stub_bin = tmp_path / "bin"
    stub_bin.mkdir()
    stub = stub_bin / "mokd-train"
    # Like mokd-train, the stub ranks leave together (here: once both have "saved"), or srun's
    # --kill-on-bad-exit would end the slower one at the first one's exit 75.
    saved = tmp_path / "saved"
    saved.mkdir()
    stub.write_text("#!/bin/bash\n"
                    f"leave() {{ echo \"stub rank $SLURM_PROCID saved\"; touch '{saved}'/$SLURM_PROCID;\n"
                    f"         until [ -e '{saved}/0' ] && [ -e '{saved}/1' ]; do sleep 0.1; done; exit 75; }}\n"
                    "trap leave USR1 TERM\n"
                    "echo \"stub rank $SLURM_PROCID ready\"\n"
                    "while true; do sleep 0.2; done\n")
    stub.chmod(0o755)
    env_script = tmp_path / "stub_env.sh"
    env_script.write_text(f"export PATH='{stub_bin}':\"$PATH\"\n")
    env = job_environment(MOKD_ENV=str(env_script), MOKD_RECIPE="tiny_cpu", MOKD_OUTPUT_ROOT=str(tmp_path / "runs"))
    _, job_id = sbatch([*TWO_CPU_NODES, "--job-name=mokd_cancel", f"--output={tmp_path}/%x-%j.out", str(FLAGSHIP)],
                       env, tmp_path, timeout=30)
    log_path = tmp_path / f"mokd_cancel-{job_id}.out"
    try:
        deadline = time.monotonic() + 60
        while len(re.findall(r"stub rank \d ready", log_path.read_text() if log_path.exists() else "")) < 2:
            assert time.monotonic() < deadline and job_listed(job_id), read_log(log_path)
            time.sleep(0.3)
        scancel(job_id)
        wait_until_gone(job_id, timeout=90)
    finally:
        scancel(job_id)
    log = read_log(log_path)
    assert "stub rank 0 saved" in log and "stub rank 1 saved" in log, log
    assert "not requeueing" in log and "restart_count=1" not in log, log
    assert final_record(job_id)["JobState"] == "CANCELLED"


def wait_for_training(job_id: str, run_dir: Path, log_path: Path, min_step: int, timeout: float) -> None:
    """Until metrics.jsonl shows min_step: every rank is then in the loop with its signal handler set."""
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while True:
        if max(logged_steps(metrics), default=0) >= min_step:
            return
        log = log_path.read_text(errors="replace") if log_path.exists() else "(no log yet)"
        assert job_listed(job_id), f"job {job_id} ended before training reached step {min_step}:\n{log}"
        assert time.monotonic() < deadline, f"no step {min_step} after {timeout:.0f} s:\n{log}"
        time.sleep(0.5)


# --- failures: a rank killed, a rank frozen, a crash that repeats ---------------------------------

def rank_pids(log: str, rank: int) -> list[int]:
    """Pids of `rank` in the order its runs started (one "ready" line per run)."""
    return [int(pid) for pid in re.findall(rf"^{rank}: .*mokd-train rank {rank}/2 ready .*pid (\d+)\)", log, re.M)]


def wait_for_log(log_path: Path, pattern: str, job_id: str, timeout: float) -> float:
    """Until `pattern` appears in the job log; returns when (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while True:
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if re.search(pattern, log, re.M):
            return time.monotonic()
        assert job_listed(job_id), f"job {job_id} ended without {pattern!r}:\n{log}"
        assert time.monotonic() < deadline, f"no {pattern!r} after {timeout:.0f} s:\n{log}"
        time.sleep(0.2)


def wait_for_pids(log_path: Path, runs: int, job_id: str, timeout: float) -> int:
    """Rank 1's pid in the job's run number `runs` (1-based), once that run trains."""
    wait_for_log(log_path, rf"(?s)(mokd-train rank 1/2 ready.*){{{runs}}}", job_id, timeout)
    return rank_pids(read_log(log_path), 1)[runs - 1]


def test_a_killed_rank_then_a_frozen_rank_each_end_the_job_which_restarts_and_finishes(slurm_cluster, tmp_path):
    """Run 1: kill -9 of rank 1 -> the step ends within 60 s (srun --kill-on-bad-exit) and the job
    requeues itself. Run 2 resumes from `latest`; rank 1 frozen with SIGSTOP -> rank 0's collective
    times out (train.collective_timeout_s) and the job requeues again. Run 3 finishes at the right step."""
    steps, timeout_s = 12, 10
    env = flagship_environment(tmp_path, f"{TINY} train.steps={steps} train.checkpoint_every=2 "
                                         f"train.collective_timeout_s={timeout_s}")
    _, job_id = sbatch([*TWO_CPU_NODES, "--job-name=mokd_faults", f"--output={tmp_path}/%x-%j.out", str(FLAGSHIP)],
                       env, tmp_path, timeout=30)
    run_dir = tmp_path / "runs" / "mokd_faults"
    log_path = tmp_path / f"mokd_faults-{job_id}.out"
    timings = {}
    try:
        wait_for_training(job_id, run_dir, log_path, min_step=3, timeout=300)
        os.kill(wait_for_pids(log_path, 1, job_id, 30), 9)
        killed = time.monotonic()
        timings["kill_to_step_end_s"] = wait_for_log(log_path, r"restart 1 of 3 after", job_id, 90) - killed
        resumed_from = latest_tag(run_dir)
        frozen_pid = wait_for_pids(log_path, 2, job_id, 120)
        timings["step_end_to_next_run_ready_s"] = time.monotonic() - killed - timings["kill_to_step_end_s"]
        wait_for_training(job_id, run_dir, log_path, min_step=int(resumed_from[5:]) + 3, timeout=120)
        os.kill(frozen_pid, signal.SIGSTOP)
        frozen = time.monotonic()
        timings["sigstop_to_step_end_s"] = wait_for_log(log_path, r"restart 2 of 3 after", job_id, timeout_s + 90) - frozen
        wait_until_gone(job_id, timeout=240)
        timings["whole_job_s"] = time.monotonic() - killed
    finally:
        scancel(job_id)
    print(f"failure timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    log = read_log(log_path)
    assert timings["kill_to_step_end_s"] < 60, log
    assert timings["sigstop_to_step_end_s"] < timeout_s + 60, log
    restarts = re.findall(r"mokd-slurm: (restart \d of 3 after: .*)", log)
    assert len(restarts) == 2, log
    assert "a rank was killed by SIGKILL" in restarts[0] and f"resumes from {resumed_from}" in restarts[0]
    assert "a rank failed with exit code" in restarts[1], restarts
    assert re.search(rf"resumed from {resumed_from}\b", log) and "restart_count=2" in log, log
    assert re.search(r"Timed out|timed out|timeout", log), "the frozen rank's peer should report a timeout"
    assert latest_tag(run_dir) == f"step_{steps:08d}"
    assert max(metric_steps(run_dir)) == steps and set(metric_steps(run_dir)) == set(range(1, steps + 1))
    record = final_record(job_id)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record


def test_a_crash_that_repeats_stops_after_a_restart_without_progress(slurm_cluster, tmp_path):
    env = flagship_environment(tmp_path, f"{TINY} train.steps=4 train.checkpoint_every=1")
    env["MOKD_FAULTS"] = "crash@1:1"  # rank 1 raises as it starts step 2, every time
    started = time.monotonic()
    code, job_id = sbatch([*TWO_CPU_NODES, "--wait", "--job-name=mokd_crash", f"--output={tmp_path}/%x-%j.out",
                           str(FLAGSHIP)], env, tmp_path, timeout=400)
    print(f"repeated crash: job ended after {time.monotonic() - started:.1f} s")
    log = read_log(tmp_path / f"mokd_crash-{job_id}.out")
    assert code != 0, log
    assert len(re.findall(r"mokd-slurm: restart \d of 3 after", log)) == 1, log
    assert "InjectedFault" in log and "resumed from step_00000001" in log
    assert "No progress since restart 1: the latest checkpoint is still step_00000001" in log
    assert final_record(job_id)["JobState"] == "FAILED"


# --- a changed node count -------------------------------------------------------------------------

def test_a_job_stopped_on_two_nodes_resumes_on_one_with_everything_carried_over(slurm_cluster, tmp_path,
                                                                                  photo_shards):
    """Shards read by a loader worker per rank, both networks ZeRO-2 (AdamW and SGD): scancel stops the job on
    2 nodes (every process of the job gets SIGTERM: the ranks save, their workers carry on); the same job
    name submitted on 1 node resumes from that checkpoint with the optimizer state re-sharded and the data
    streams taking over the unread samples, and finishes every step once."""
    steps, zero2 = 8, REPO / "ds_configs" / "zero2_bf16.json"
    overrides = (f"{TINY} train.steps={steps} train.checkpoint_every=1000 data.source=shards "
                 f"data.train_shards={photo_shards} data.workers=1 data.shuffle_buffer=4 "
                 f"networks.a.deepspeed={zero2} networks.b.deepspeed={zero2} networks.b.optimizer=sgd")
    env = flagship_environment(tmp_path, overrides)
    job = ["--job-name=mokd_shrink", f"--output={tmp_path}/%x-%j.out", str(FLAGSHIP)]
    _, job_id = sbatch([*TWO_CPU_NODES, *job], env, tmp_path, timeout=30)
    run_dir = tmp_path / "runs" / "mokd_shrink"
    try:
        wait_for_training(job_id, run_dir, tmp_path / f"mokd_shrink-{job_id}.out", min_step=2, timeout=300)
        scancel(job_id)
        wait_until_gone(job_id, timeout=240)
    finally:
        scancel(job_id)
    stopped = read_log(tmp_path / f"mokd_shrink-{job_id}.out")
    saved = re.findall(r"preempted: checkpoint (step_\d+) saved", stopped)
    assert len(saved) == 2 and saved[0] == saved[1] == latest_tag(run_dir), stopped
    one_node = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--wait"]
    code, second = sbatch([*one_node, *job], env, tmp_path, timeout=420)
    log = read_log(tmp_path / f"mokd_shrink-{second}.out")
    assert code == 0, log
    resumed = re.search(rf"resumed from {saved[0]} \(step \d+, saved by 2 ranks, now 1\): (.*)", log)
    assert resumed, log
    for carried in ("adamw state re-sharded from 2 ranks onto 1", "sgd state re-sharded from 2 ranks onto 1",
                    "data streams take over the unread samples", "RNG re-seeded from the step"):
        assert carried in resumed.group(1), resumed.group(1)
    assert metric_steps(run_dir) == list(range(1, steps + 1))
    assert latest_tag(run_dir) == f"step_{steps:08d}"
