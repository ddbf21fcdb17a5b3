"""End-to-end training behaviour on CPU: resume, checkpoints, faults, ZeRO stages (issue 5).

Every run is the real mokd-train entry point (in-process on spawned gloo ranks, or as a
subprocess where the test kills it), with tiny models and the synthetic source so that a
global batch depends only on the step.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mokd_scale.train.checkpoint import read_latest, read_state
from tests.dist_harness import run_on_ranks

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent
TINY = ["data.source=synthetic", "train.global_batch_size=16", "train.micro_batch_size=8",
        "data.samples_per_epoch=160", "train.log_every=1", "train.checkpoint_every=1000",
        "mokd.out_dim=256", "data.synthetic_image_size=36", "data.workers=0"]


def train(rank, world_size, overrides, resume="auto", env=None, capture=False):
    """mokd-train on this rank; returns (exit code, console output: stdout then stderr)."""
    from mokd_scale.train import main
    output, errors = io.StringIO(), io.StringIO()
    with environment(env or {}), contextlib.ExitStack() as stack:
        if capture:
            stack.enter_context(contextlib.redirect_stdout(output))
            stack.enter_context(contextlib.redirect_stderr(errors))
        code = main(["--config", "tiny_cpu", "--resume", resume, "--set", *TINY, *overrides])
    return code, output.getvalue() + errors.getvalue()


@contextlib.contextmanager
def environment(variables: dict[str, str]):
    """Set for one run only: later runs in the same rank process must not inherit a fault."""
    saved = {key: os.environ.get(key) for key in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def expect_code(rank, world_size, expected, overrides, resume="auto", env=None):
    code, output = train(rank, world_size, overrides, resume, env, capture=True)
    assert code == expected, f"rank {rank} exited {code}, expected {expected}:\n{output}"
    return output


def expect_codes(rank, world_size, runs):
    """Several runs in the same rank processes (saves a spawn and imports per run)."""
    return [expect_code(rank, world_size, *run) for run in runs]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def teacher_weights(output_dir: Path, tag: str | None = None) -> dict:
    tag = tag or read_latest(output_dir / "checkpoints")
    return read_state(output_dir / "checkpoints" / tag)["teachers"]


LOSS_KEYS = [f"{n}.{t}" for n in "ab" for t in ("self_proj", "self_search", "cross_proj", "cross_search", "loss")]


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    """Real JPEG shards: the ImageNet-shaped fixture through mokd-shards, 4 samples a shard,
    shrunk to 64 px (decoding full-size photos would dominate the test's time)."""
    from tests.imagenet_fixture import make_imagenet_root
    folder = tmp_path_factory.mktemp("photos")
    root = make_imagenet_root(folder, n_classes=3, per_class=6)
    subprocess.run([sys.executable, "-m", "mokd_scale.tools.make_shards", "--imagenet-root", str(root),
                    "--split", "train", "--out", str(folder / "shards"), "--samples-per-shard", "4",
                    "--resize-short-side", "64", "--workers", "1"], check=True, capture_output=True, timeout=120)
    return folder / "shards" / "imagenet-train.json"


def test_resume_on_shards_equals_straight_run(tmp_path, photo_shards):
    """Two loader workers, a shuffle buffer bigger than a shard, 3 steps an epoch: the stop after step 1
    falls mid-epoch with worker 1's batch next, the resumed run crosses an epoch. One rank keeps the
    test cheap; the loader's positions on a second rank are tested in test_data_pipeline.py."""
    straight, sliced = tmp_path / "straight", tmp_path / "sliced"
    shards = ["data.source=shards", f"data.train_shards={photo_shards}", "data.workers=2",
              "data.shuffle_buffer=6", "train.global_batch_size=4", "train.micro_batch_size=4",
              "data.samples_per_epoch=12", "train.steps=4"]
    outputs = run_on_ranks(expect_codes, 1, ([
        (0, [*shards, f"output_dir={straight}"]),
        (0, [*shards, "train.stop_after_steps=1", f"output_dir={sliced}"]),
        (0, [*shards, f"output_dir={sliced}"]),
    ],), timeout=400)
    a, b = metrics(straight), metrics(sliced)
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for left, right in zip(a, b):
        for key in LOSS_KEYS:
            assert right[key] == pytest.approx(left[key], rel=1e-6, abs=1e-7), (left["step"], key)
    assert "resumed from step_00000001" in outputs[2] and "continues the saved stream positions" in outputs[2]


def truncate_to_half(path: Path) -> None:
    """What a disk that filled up, or a copy cut short, leaves behind."""
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def resume_over_damaged_checkpoints(rank, world_size, out: Path):
    checkpoints = out / "checkpoints"
    run = [f"output_dir={out}", "train.checkpoint_every=2", "train.steps=4"]
    first = expect_code(rank, world_size, 0, run)
    if rank == 0:
        truncate_to_half(checkpoints / "step_00000004" / "a" / "mp_rank_00_model_states.pt")
    torch.distributed.barrier()
    fell_back = expect_code(rank, world_size, 0, run, "auto")
    if rank == 0:
        for tag in ("step_00000002", "step_00000004"):
            truncate_to_half(checkpoints / tag / "mokd_state.pt")
    torch.distributed.barrier()
    refused = expect_code(rank, world_size, 4, run)
    return first, fell_back, refused


def test_damaged_latest_falls_back_with_a_warning_and_none_usable_stops(tmp_path):
    out = tmp_path / "damaged"
    _, fell_back, refused = run_on_ranks(resume_over_damaged_checkpoints, 2, (out,), timeout=300)
    assert "step_00000004 is not usable: a/mp_rank_00_model_states.pt has" in fell_back
    assert "truncated" in fell_back and "resumed from step_00000002" in fell_back
    steps = metrics(out)
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 3, 4]  # the refused run trained nothing
    for left, right in zip(steps[2:4], steps[4:6]):  # the fallback resumed step 2's exact state
        for key in LOSS_KEYS:
            assert right[key] == pytest.approx(left[key], rel=1e-6, abs=1e-7), (left["step"], key)
    assert "cannot resume: no usable checkpoint" in refused and "mokd_state.pt has" in refused
    assert "--resume none" in refused and "Traceback" not in refused


def fail_a_save_then_resume(rank, world_size, out: Path):
    run = [f"output_dir={out}", "train.steps=3", "train.checkpoint_every=1"]
    failed = expect_code(rank, world_size, 74, run, "auto", {"MOKD_FAULTS": "save_error@2:0"})
    after_failure = (read_latest(out / "checkpoints"), (out / "checkpoints" / "step_00000002").exists())
    resumed = expect_code(rank, world_size, 0, run)
    return failed, after_failure, resumed


def test_a_failed_save_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    """Rank 0's writes fail inside DeepSpeed's save, which has collectives after them: without the
    agreement rank 1 would wait there until the collective timeout."""
    out = tmp_path / "full_disk"
    failed, after_failure, resumed = run_on_ranks(fail_a_save_then_resume, 2, (out,), timeout=300)
    assert "checkpoint step_00000002 could not be written" in failed
    assert "rank 0: writing" in failed and "No space left on device" in failed
    assert "(step_00000001) is untouched" in failed
    assert after_failure == ("step_00000001", False)
    assert "resumed from step_00000001" in resumed and read_latest(out / "checkpoints") == "step_00000003"


def test_independent_mode_trains_each_network_alone_with_dino(tmp_path):
    out = tmp_path / "independent"
    run_on_ranks(expect_code, 1, (0, ["train.steps=2", "mokd.mode=independent", f"output_dir={out}"]), timeout=240)
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    for row in rows:
        for name in "ab":
            assert row[f"{name}.loss"] == pytest.approx(row[f"{name}.self_proj"])
            assert not any(f"{name}.{term}" in row for term in ("self_search", "cross_proj", "cross_search"))
    teachers = teacher_weights(out)
    assert all(not any(key.startswith("search_head.") for key in teachers[name]) for name in "ab")
    assert any(key.startswith("projection_head.") for key in teachers["a"])


ZERO_CONFIGS = {0: "ds_configs/zero0_fp32_cpu.json", 1: "ds_configs/zero1_bf16.json",
                2: "ds_configs/zero2_bf16.json", 3: "ds_configs/zero3_bf16.json"}


def zero_stage_overrides(tmp_path: Path, stage: int) -> list[str]:
    path = ZERO_CONFIGS[stage]
    return ["train.steps=3", f"output_dir={tmp_path / f'zero{stage}'}", f"networks.a.deepspeed={path}",
            f"networks.b.deepspeed={path}", "networks.b.optimizer=sgd", "networks.b.lr=0.05"]


def test_zero_stages_match_zero0(tmp_path):
    runs = [(0, zero_stage_overrides(tmp_path, stage)) for stage in (0, 1, 2, 3)]
    run_on_ranks(expect_codes, 2, (runs,), timeout=400)
    reference = metrics(tmp_path / "zero0")
    for stage in (1, 2, 3):
        run = metrics(tmp_path / f"zero{stage}")
        assert len(run) == len(reference) == 3
        for left, right in zip(reference, run):
            for key in LOSS_KEYS:
                assert right[key] == pytest.approx(left[key], rel=1e-4), (stage, left["step"], key)


# ZeRO-2, AdamW (a) and SGD (b), two tiny ViTs: without BatchNorm the rank count does not change the numbers on
# CPU, so a straight run on the new world size is the reference for a resumed one.
RESHARD = [f"networks.a.deepspeed={ZERO_CONFIGS[2]}", f"networks.b.deepspeed={ZERO_CONFIGS[2]}",
           "networks.b.optimizer=sgd", "networks.b.lr=0.05", "networks.b.arch=vit_tiny_patch16_224",
           "networks.b.arch_kwargs={patch_size: 4, img_size: 32, embed_dim: 64, depth: 1, num_heads: 2}",
           "networks.a.arch_kwargs={patch_size: 4, img_size: 32, embed_dim: 64, depth: 2, num_heads: 2}",
           "networks.a.proj_batchnorm=false", "networks.b.proj_batchnorm=false", "mokd.out_dim=128",
           "train.steps=5", "train.checkpoint_every=2", "train.keep_last=3"]


def resumed_optimizer_state(rank, world_size, overrides, tag_dir: Path) -> dict:
    """Each network's fp32 weights and optimizer state right after loading tag_dir, gathered whole by
    DeepSpeed's own accessors (not by the code under test)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from mokd_scale.config import load_config
    from mokd_scale.runtime import dist
    from mokd_scale.train.checkpoint import load_state
    from mokd_scale.train.loop import build_learners
    from mokd_scale.train.state import Progress, run_state
    config = load_config("tiny_cpu", [*TINY, *overrides])
    learners = build_learners(config, dist.init_distributed(), fresh=False)
    run_state(learners, None, Progress()).load(tag_dir, load_state(tag_dir))
    gathered = {}
    for name, learner in learners.items():
        zero = learner.engine.optimizer
        if learner.zero_stage == 3:
            flats, groups = zero.fp32_partitioned_groups_flat, zero.fp16_groups
        else:
            zero._lazy_init_hp_params_optimizer_state()  # DeepSpeed links its fragments to the state at a step
            flats, groups = zero.single_partition_of_fp32_groups, zero.bit16_groups
        for flat, params in zip(flats, groups):
            keys = [key for key, value in zero.optimizer.state[flat].items() if torch.is_tensor(value)
                    and value.shape == flat.shape]
            for param in params:
                prefix = f"{name}.{zero.param_names[param]}"
                gathered[f"{prefix}.fp32"] = safe_get_full_fp32_param(param)
                for key in keys:
                    gathered[f"{prefix}.{key}"] = safe_get_full_optimizer_state(param, key)
    return {key: value.numpy().copy() for key, value in gathered.items()}


def straight_then_resume(rank, world_size, straight: Path | None, resumed: Path, tag_dir: Path | None,
                         overrides: tuple = ()):
    """A straight run on this world size (its step-2 checkpoint is the other world size's starting point),
    then a resume of tag_dir, a checkpoint of the other world size, and the state it loads (either optional)."""
    runs = [*RESHARD, *overrides]
    if straight is not None:
        expect_code(rank, world_size, 0, runs + [f"output_dir={straight}"])
    if tag_dir is None:
        return None
    output = expect_code(rank, world_size, 0, runs + [f"output_dir={resumed}"], resume=str(tag_dir))
    return output, resumed_optimizer_state(rank, world_size, runs, tag_dir)


def saved_optimizer_state(tag_dir: Path) -> dict:
    """The same keys, read from the checkpoint's files; the fp32 weights checked against DeepSpeed's zero_to_fp32."""
    from mokd_scale.engine.zero_layout import saved_partitions
    from mokd_scale.train.checkpoint import student_weights
    state = {}
    for name in "ab":
        saved, weights = saved_partitions(tag_dir / name), student_weights(tag_dir, name)
        for group in range(saved.group_count):
            for param in saved.names(group):
                for key in saved.partitioned_keys(group):
                    state[f"{name}.{param}.{key}"] = saved.whole(group, param, key)
                torch.testing.assert_close(state[f"{name}.{param}.fp32"], weights[param].flatten(), rtol=0, atol=0)
    return state


def test_resume_onto_another_world_size_carries_the_optimizer_state(tmp_path):
    """ZeRO-2 checkpoints of 1 rank resumed on 2 and of 2 resumed on 1: every optimizer's state (SGD's momentum,
    AdamW's moments and step) and the fp32 weights arrive whole, and the run goes on exactly as a straight run
    on the new world size (each straight run's step-2 checkpoint is what the other world size resumes)."""
    straight = {ranks: tmp_path / f"straight{ranks}" for ranks in (1, 2)}
    resumed = {ranks: tmp_path / f"resumed{ranks}" for ranks in (1, 2)}
    tag = {ranks: straight[ranks] / "checkpoints" / "step_00000002" for ranks in (1, 2)}
    run_on_ranks(straight_then_resume, 1, (straight[1], resumed[1], None), timeout=240)
    on_two = run_on_ranks(straight_then_resume, 2, (straight[2], resumed[2], tag[1]), timeout=300)
    on_one = run_on_ranks(straight_then_resume, 1, (None, resumed[1], tag[2]), timeout=300)
    for new_ranks, (output, state) in ((2, on_two), (1, on_one)):
        check_resumed(output, state, tag[3 - new_ranks], metrics(straight[new_ranks]), metrics(resumed[new_ranks]),
                      3 - new_ranks, new_ranks)


def check_resumed(output: str, state: dict, tag_dir: Path, reference: list, continued: list, saved_ranks: int,
                  new_ranks: int) -> None:
    """The resume said so, loaded every state key exactly, and went on as the straight run on its world size."""
    assert f"saved by {saved_ranks} ranks, now {new_ranks}" in output
    assert "sgd state re-sharded" in output and "adamw state re-sharded" in output
    expected = saved_optimizer_state(tag_dir)
    assert state.keys() == expected.keys()
    assert any(key.endswith("momentum_buffer") for key in state) and any(key.endswith("exp_avg") for key in state)
    for key, value in expected.items():
        torch.testing.assert_close(torch.from_numpy(state[key]).flatten(), value.flatten(), rtol=0, atol=0, msg=key)
    assert [m["step"] for m in continued] == list(range(3, len(reference) + 1))
    for left, right in zip(reference[2:], continued):
        for key in LOSS_KEYS:
            assert right[key] == pytest.approx(left[key], rel=1e-5, abs=1e-6), (new_ranks, left["step"], key)


def test_resume_onto_fewer_ranks_carries_the_zero3_optimizer_state(tmp_path):
    """The same at ZeRO-3 (every parameter sharded), 2 ranks onto 1, over two steps after the resume."""
    zero3 = (f"networks.a.deepspeed={ZERO_CONFIGS[3]}", f"networks.b.deepspeed={ZERO_CONFIGS[3]}", "train.steps=4")
    straight, resumed = tmp_path / "straight2", tmp_path / "resumed1"
    run_on_ranks(straight_then_resume, 2, (straight, None, None, zero3), timeout=240)
    tag_dir = straight / "checkpoints" / "step_00000002"
    output, state = run_on_ranks(straight_then_resume, 1, (tmp_path / "straight1", resumed, tag_dir, zero3),
                                 timeout=300)
    check_resumed(output, state, tag_dir, metrics(tmp_path / "straight1"), metrics(resumed), 2, 1)


def test_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "nan"
    env = {"MOKD_FAULTS": "nan@1:1"}
    output = run_on_ranks(expect_code, 2, (3, ["train.steps=4", f"output_dir={out}"], "auto", env), timeout=180)
    assert "non-finite" in output and "network a" in output and "step 1" in output
    assert (out / "diagnostic_step_00000001" / "latest").is_file()
    assert read_latest(out / "checkpoints") is None  # resume never picks a diagnostic checkpoint


def preempt_rank_one_then_resume(rank, world_size, out: Path, overrides):
    """SIGUSR1 reaches rank 1 only, once training runs; then the same ranks start again."""
    if rank == 1:
        def send_when_training():
            while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGUSR1)
        threading.Thread(target=send_when_training, daemon=True).start()
    preempted = expect_code(rank, world_size, 75, overrides)
    tag = read_latest(out / "checkpoints")
    resumed = expect_code(rank, world_size, 0, overrides)
    return preempted, tag, resumed


def test_sigusr1_on_one_rank_checkpoints_and_resumed_run_continues(tmp_path):
    out = tmp_path / "preempt"
    overrides = ["train.steps=6", f"output_dir={out}"]
    preempted, tag, resumed = run_on_ranks(preempt_rank_one_then_resume, 2, (out, overrides), timeout=300)
    assert "preempted" in preempted
    stopped_at = int(tag.split("_")[1])
    assert 1 <= stopped_at < 6
    assert f"resumed from {tag}" in resumed
    steps = [m["step"] for m in metrics(out)]
    assert steps == list(range(1, 7))


def run_module(args, env=None, timeout=240):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "mokd_scale.train", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def test_kill_during_save_resumes_from_previous_checkpoint(tmp_path):
    out = tmp_path / "killed"
    args = ["--config", "tiny_cpu", "--set", *TINY, "train.steps=3", "train.checkpoint_every=1", f"output_dir={out}"]
    killed = run_module(args, env={"MOKD_FAULTS": "kill_in_save@2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert read_latest(out / "checkpoints") == "step_00000001"
    assert (out / "checkpoints" / "step_00000002" / "a").is_dir()  # the half-written save is there...
    resumed = run_module(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step_00000001" in resumed.stdout  # ...but never used
    assert read_latest(out / "checkpoints") == "step_00000003"


@pytest.mark.parametrize("overrides, key", [
    (["networks.b.arch=vit_small_patch16_224"], "networks.b.arch_kwargs"),  # the ResNet's kwargs stay behind
    (["networks.b.arch=vit_small_patch16_224", "networks.b.arch_kwargs={}"], "mokd.search_dim"),  # widths 128, 384
])
def test_model_mistakes_stop_before_any_process_group_naming_the_key(tmp_path, overrides, key):
    done = run_module(["--config", "tiny_cpu", "--out", str(tmp_path), "--set", *overrides])
    assert done.returncode == 2 and key in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "ready on" not in done.stdout
    assert not any(tmp_path.iterdir())  # nothing started, nothing written


def test_help_and_print_config_answer_without_torch():
    probe = "import sys, mokd_scale.train; print(sorted(m for m in ('torch', 'deepspeed', 'timm') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    shown = run_module(["--help"])
    assert shown.returncode == 0 and "networks.a" in shown.stdout and "--print-config" in shown.stdout
    printed = run_module(["--print-config", "--config", "tiny_cpu", "--set", "mokd.mode=independent"])
    assert printed.returncode == 0 and "mode: independent  # " in printed.stdout


def test_bad_override_fails_fast_naming_the_key(tmp_path):
    started = time.monotonic()
    bogus = run_module(["--config", "tiny_cpu", "--set", "bogus.key=1", f"output_dir={tmp_path}"])
    wrong_type = run_module(["--config", "tiny_cpu", "--set", "train.steps=abc", f"output_dir={tmp_path}"])
    assert time.monotonic() - started < 60
    assert bogus.returncode == 2 and "bogus.key" in bogus.stderr
    assert wrong_type.returncode == 2 and "train.steps" in wrong_type.stderr and "abc" in wrong_type.stderr
    assert not (tmp_path / "checkpoints").exists()
