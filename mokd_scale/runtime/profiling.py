"""Named phases of the training step, for profilers and the operator counter.

`with phase("ema"):` marks a region for torch.profiler (as `mokd/ema`) and records the phase
name in a module-level variable that an operator-counting dispatch mode reads
(`current_phase()`). A module-level variable rather than a thread-local: autograd runs CPU
backward in the calling thread, and the counter is a CPU tool.
"""
from __future__ import annotations

import contextlib

import torch

_current: list[str] = []


@contextlib.contextmanager
def phase(name: str):
    _current.append(name)
    try:
        with torch.profiler.record_function(f"mokd/{name}"):
            yield
    finally:
        _current.pop()


def current_phase() -> str:
    """The innermost phase being run, or "other" outside any."""
    return _current[-1] if _current else "other"
