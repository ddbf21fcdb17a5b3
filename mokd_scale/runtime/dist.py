"""Process group set-up from torchrun, Slurm (srun) or a single process, and collectives.

Every helper here also works without a process group (one process), so callers need no
`if distributed` branches.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

SLURM_PORT_BASE = 20000
SLURM_PORT_RANGE = 20000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: `gpu[001-003,010],cpu7` → gpu001 gpu002 gpu003 gpu010 cpu7.
    The job script asks `scontrol show hostnames` instead; this is for srun without it (tested to agree)."""
    hosts: list[str] = []
    for item in split_top_level(nodelist):
        match = re.fullmatch(r"([^\[\]]*)\[([^\]]+)\](.*)", item)
        if not match:
            if "[" in item or "]" in item:
                raise ValueError(f"cannot parse SLURM_JOB_NODELIST item {item!r}")
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        tails = expand_nodelist(suffix) if suffix else [""]
        hosts.extend(prefix + number + tail for number in expand_ranges(ranges) for tail in tails)
    return hosts


def split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    if current:
        items.append(current)
    return [item.strip() for item in items if item.strip()]


def expand_ranges(ranges: str) -> list[str]:
    """`001-003,010` → 001 002 003 010, keeping zero padding."""
    numbers = []
    for part in ranges.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            width = len(low)
            numbers.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
        else:
            numbers.append(part)
    return numbers


def slurm_master_port(job_id: str) -> int:
    """Same port on every task of a job, different for concurrent jobs on shared nodes."""
    return SLURM_PORT_BASE + zlib.crc32(job_id.encode()) % SLURM_PORT_RANGE


def env_from_slurm(environ: dict[str, str]) -> dict[str, str]:
    """torch.distributed env:// variables derived from an srun task's Slurm variables."""
    hosts = expand_nodelist(environ["SLURM_JOB_NODELIST"])
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or hosts[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(slurm_master_port(environ["SLURM_JOB_ID"])),
    }


def launch_env(environ: dict[str, str]) -> dict[str, str]:
    """The env:// variables for this process: torchrun's, Slurm's, or a single process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                if k in environ}
    if "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ:
        return env_from_slurm(environ)
    # The batch shell itself (no srun step) sees SLURM_NTASKS of the whole job: one process.
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Create the process group (nccl with CUDA, else gloo) and export RANK etc. for libraries.

    timeout_s bounds every collective: a rank that died or froze ends the others' wait after it
    (NCCL's watchdog aborts the process when TORCH_NCCL_ASYNC_ERROR_HANDLING is on, its default)."""
    env = launch_env(dict(os.environ))
    os.environ.update(env)  # webdataset and DeepSpeed read these
    rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    device = select_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if device.type == "cuda" else None)
        apply_timeout_to_new_groups(timeout)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def apply_timeout_to_new_groups(timeout: datetime.timedelta) -> None:
    """DeepSpeed runs ZeRO's collectives on its own copy of the world group, made by dist.new_group()
    without a timeout, which takes torch's backend default (NCCL 10 min, gloo 30 min) instead of ours."""
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def select_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place, and returned; a no-op in one process."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when the flag is set on any rank; every rank gets the same answer."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_max(value).item() > 0)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's tensor along dim 0; ranks may hold different lengths."""
    if not is_dist():
        return tensor
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world_size())]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(gathered, padded)
    return torch.cat([part[: int(n.item())] for part, n in zip(gathered, lengths)])


def all_gather_object(obj) -> list:
    """Every rank's picklable object, in rank order, on every rank; also a barrier."""
    if not is_dist():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()
