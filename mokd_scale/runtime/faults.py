"""Faults injected on purpose, for tests: off unless MOKD_FAULTS names them.

    MOKD_FAULTS="nan@3:1,crash@5"      comma-separated KIND@STEP or KIND@STEP:RANK (no rank: every rank)

KIND            what happens at STEP (0-based: the step being trained, or the step a checkpoint is saved at)
nan             the first network's loss becomes NaN
crash           the rank raises InjectedFault as the step starts (a bug, an out-of-memory error)
kill_in_save    the rank kills itself (SIGKILL) between the two engines' saves of the checkpoint
save_error      every checkpoint file the rank writes fails with ENOSPC (no space left on the device)
slow_save       the rank writes its files of the checkpoint SLOW_SAVE_S seconds late

The variable is read at each call, so a test may set it between runs in one process. Every hook is
a no-op when it is unset. Nothing else in the package knows about faults: the hooks are called at
the spots where the real fault would strike.
"""
from __future__ import annotations

import errno
import os
import signal
import time

import torch

from mokd_scale.runtime import dist

VARIABLE = "MOKD_FAULTS"
KINDS = ("nan", "crash", "kill_in_save", "save_error", "slow_save")
SLOW_SAVE_S = 1.5  # far longer than srun takes to end a step after a rank's exit (~0.1 s)


class InjectedFault(RuntimeError):
    """Raised by the `crash` fault."""


def parse(text: str) -> list[tuple[str, int, int | None]]:
    """"nan@3:1,crash@5" -> [("nan", 3, 1), ("crash", 5, None)]."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, _, where = item.partition("@")
        step, _, rank = where.partition(":")
        if kind not in KINDS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{VARIABLE}: bad item {item!r}; expected KIND@STEP[:RANK] with KIND one of {KINDS}")
        faults.append((kind, int(step), int(rank) if rank else None))
    return faults


def armed(kind: str, step: int) -> bool:
    """Whether fault `kind` strikes this rank at `step`."""
    text = os.environ.get(VARIABLE)
    if not text:
        return False
    return any(k == kind and s == step and r in (None, dist.rank()) for k, s, r in parse(text))


def poison_loss(step: int, network_index: int, loss: torch.Tensor) -> torch.Tensor:
    """The `nan` fault strikes the recipe's first network."""
    if network_index == 0 and armed("nan", step):
        return loss * float("nan")
    return loss


def step_starts(step: int) -> None:
    if armed("crash", step):
        raise InjectedFault(f"{VARIABLE}: crash at step {step} on rank {dist.rank()}")


def between_engine_saves(step: int) -> None:
    if armed("kill_in_save", step):
        os.kill(os.getpid(), signal.SIGKILL)


def before_checkpoint_write(step: int, path: str) -> None:
    if armed("save_error", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def before_rank_files(step: int) -> None:
    if armed("slow_save", step):
        time.sleep(SLOW_SAVE_S)
