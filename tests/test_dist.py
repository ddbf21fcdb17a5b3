import os

import pytest
import torch
import torch.distributed as dist

from mokd_scale.runtime import dist as mdist
from tests.dist_harness import RankFailed, run_on_ranks


def test_expand_nodelist_brackets_padding_and_plain_hosts():
    assert mdist.expand_nodelist("gpu[001-003,010],cpu7") == ["gpu001", "gpu002", "gpu003", "gpu010", "cpu7"]
    assert mdist.expand_nodelist("n1") == ["n1"]
    assert mdist.expand_nodelist("a[1-2]-ib[0-1]") == ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]
    assert mdist.expand_nodelist("node[9-11]") == ["node9", "node10", "node11"]


def test_expand_nodelist_rejects_garbage():
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        mdist.expand_nodelist("gpu[001")


def slurm_env(**extra):
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0"}
    env.update(extra)
    return env


def test_slurm_env_maps_to_torch_env():
    env = mdist.launch_env(slurm_env())
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "gpu007"
    assert env["MASTER_PORT"] == str(mdist.slurm_master_port("4242"))


def test_slurm_port_is_deterministic_per_job_and_differs_between_jobs():
    assert mdist.slurm_master_port("4242") == mdist.slurm_master_port("4242")
    ports = {mdist.slurm_master_port(str(job)) for job in range(100, 120)}
    assert len(ports) > 15
    assert all(mdist.SLURM_PORT_BASE <= p < mdist.SLURM_PORT_BASE + mdist.SLURM_PORT_RANGE for p in ports)


def test_torchrun_env_wins_over_slurm_and_batch_shell_is_single_process():
    env = mdist.launch_env({**slurm_env(), "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    batch_shell = slurm_env()
    del batch_shell["SLURM_STEP_NUM_TASKS"]
    assert mdist.launch_env(batch_shell)["WORLD_SIZE"] == "1"
    assert mdist.launch_env({})["WORLD_SIZE"] == "1"


def all_reduce_rank_values(rank, world_size):
    total = mdist.all_reduce_sum(torch.tensor([float(rank + 1)]))
    gathered = mdist.all_gather_cat(torch.arange(rank + 1, dtype=torch.float32))
    return total.item(), gathered.tolist(), mdist.any_rank(rank == 1, torch.device("cpu"))


@pytest.mark.integration
def test_two_ranks_all_reduce_and_gather():
    total, gathered, any_flag = run_on_ranks(all_reduce_rank_values, world_size=2, timeout=60)
    assert total == 3.0
    assert gathered == [0.0, 0.0, 1.0]
    assert any_flag is True


def hang_on_rank_one(rank, world_size):
    if rank == 1:
        import time
        time.sleep(600)
    dist.barrier()


@pytest.mark.integration
def test_hanging_rank_fails_within_timeout():
    import time
    start = time.monotonic()
    with pytest.raises(RankFailed, match="did not finish"):
        run_on_ranks(hang_on_rank_one, world_size=2, timeout=8)
    assert time.monotonic() - start < 30


def time_out_on_a_group_made_later(rank, world_size):
    """A frozen rank 1; rank 0 waits in a collective on a group made after init, as DeepSpeed's copy
    of the world group is. Returns how long rank 0 waited."""
    import time
    mdist.init_distributed(timeout_s=1.5)
    group = dist.new_group(list(range(world_size)))
    if rank == 1:
        time.sleep(4.5)  # rank 0 gives up meanwhile
        return None
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="(?i)timed? ?out"):
        dist.all_reduce(torch.ones(1), group=group)
    return time.monotonic() - started


@pytest.mark.integration
def test_collective_timeout_applies_to_groups_made_later():
    waited = run_on_ranks(time_out_on_a_group_made_later, world_size=2, timeout=60, init=False)
    assert 1.0 < waited < 4.4  # torch's own default for such a group would be 30 min


def raise_on_rank_one(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom on rank one")
    return rank


@pytest.mark.integration
def test_failing_rank_reports_its_traceback():
    with pytest.raises(RankFailed, match="boom on rank one"):
        run_on_ranks(raise_on_rank_one, world_size=2, timeout=30)


def test_single_process_init_without_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    info = mdist.init_distributed()
    try:
        assert (info.rank, info.world_size) == (0, 1)
        assert os.environ["WORLD_SIZE"] == "1"
        assert mdist.all_gather_cat(torch.ones(2)).shape == (2,)
    finally:
        mdist.destroy()
