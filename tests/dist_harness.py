"""Run a function on several CPU ranks (gloo, localhost) inside a test.

Each rank is a spawned process with its own process group. A failure on any rank raises
in the test with that rank's traceback; a hang is killed at the timeout and fails the
test instead of stalling CI.
"""
from __future__ import annotations

import os
import pickle
import queue
import time
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from mokd_scale.runtime.dist import free_port


class RankFailed(AssertionError):
    pass


def run_on_ranks(fn, world_size: int = 2, args: tuple = (), timeout: float = 120.0, init: bool = True):
    """Call fn(rank, world_size, *args) on each rank; return rank 0's result. init=False leaves the
    process group to fn (the launch variables are set)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    # Not daemonic: a rank may start DataLoader workers. The `finally` below kills what is left.
    processes = [context.Process(target=rank_main, args=(fn, rank, world_size, port, args, results, init))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        return collect(results, processes, world_size, timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join(5)


def collect(results, processes, world_size: int, timeout: float):
    """Wait for every rank; fail fast when one dies without reporting (e.g. killed, segfault)."""
    outcome: dict[int, tuple[bool, object]] = {}
    deadline = time.monotonic() + timeout
    while len(outcome) < world_size:
        try:
            rank, ok, value = results.get(timeout=1.0)
        except queue.Empty:
            check_alive(processes, outcome, deadline, timeout)
            continue
        outcome[rank] = (ok, value)
        if not ok:
            raise RankFailed(f"rank {rank} failed:\n{value}")
    return pickle.loads(outcome[0][1])


def check_alive(processes, outcome: dict, deadline: float, timeout: float) -> None:
    for rank, process in enumerate(processes):
        # Exit code 0 means its result may still be in the queue's pipe: keep waiting for it.
        if rank not in outcome and process.exitcode not in (None, 0):
            raise RankFailed(f"rank {rank} died with exit code {process.exitcode} without reporting")
    if time.monotonic() > deadline:
        missing = sorted(set(range(len(processes))) - set(outcome))
        raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f} s (hang?)")


def rank_main(fn, rank: int, world_size: int, port: int, args: tuple, results, init: bool = True) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    import torch
    torch.set_num_threads(1)
    try:
        if init:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Plain pickle bytes: a tensor sent as-is travels through shared memory that vanishes when
        # this process exits, before the parent may have read it.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
