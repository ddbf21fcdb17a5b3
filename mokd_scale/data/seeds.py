"""Seeds derived from several integers, so every (seed, epoch, rank, worker, ...) stream differs."""
from __future__ import annotations

import random

import numpy as np
import torch


def mixed_seed(*parts: int) -> int:
    """A 64-bit seed that depends on every part (SeedSequence hashes them; no collisions by sum)."""
    words = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


def mixed_rng(*parts: int) -> random.Random:
    return random.Random(mixed_seed(*parts))


def random_state(rng: random.Random) -> dict:
    """A Random's state as a tensor: it survives the DataLoader's conversions (which turn tuples into
    lists) and torch.load(weights_only=True)."""
    version, internal, gauss = rng.getstate()
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def set_random_state(rng: random.Random, state: dict) -> None:
    rng.setstate((int(state["version"]), tuple(int(v) for v in state["internal"].tolist()), state["gauss"]))
