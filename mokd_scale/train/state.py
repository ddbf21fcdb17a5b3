"""What a checkpoint holds, as named parts: every stateful piece of a run registers once, and save,
manifest, verification, fallback, world-size conversion and resume walk the registry (train/checkpoint.py
does the files). Adding a stateful part is one `register` call in `run_state`.

A part's name says where it lives in a checkpoint tag folder, by its scope:
  SHARED  rank 0 writes it into mokd_state.pt; a dotted name nests ("teachers.a" is state["teachers"]["a"])
  RANK    every rank writes its own into rank{r}.pt (RNG, data-stream position)
  ENGINE  a DeepSpeed engine: a collective save into the folder of that name (sharded optimizer state)
SHARED and RANK parts have `state_dict()` / `load_state_dict(state)`; ENGINE parts `save(tag_dir)` /
`load(tag_dir, saved_world_size) -> note`.

Resuming onto another number of ranks: SHARED parts load as they are (world-size independent); ENGINE
parts re-cut their ZeRO partitions (train/checkpoint.py: resume_plan, engine/reshard.py); a RANK part
with `load_state_dicts_of_ranks` receives every saved rank's state (the data streams deal what they had
not yet handed out over the new ranks), the others (the RNG) stay as the step seeded them.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mokd_scale.engine.zero_layout import LayoutError
from mokd_scale.runtime import dist
from mokd_scale.train import checkpoint
from mokd_scale.train.checkpoint import CheckpointError

SHARED, RANK, ENGINE = "shared", "rank", "engine"


@dataclass(frozen=True)
class Part:
    name: str
    obj: Any
    scope: str


class RunState:
    def __init__(self):
        self.parts: dict[str, Part] = {}

    def register(self, name: str, obj: Any, scope: str = SHARED) -> None:
        if name in self.parts:
            raise ValueError(f"checkpoint part {name!r} registered twice")
        self.parts[name] = Part(name, obj, scope)

    def of_scope(self, scope: str) -> list[Part]:
        return [part for part in self.parts.values() if part.scope == scope]

    # --- save (train/checkpoint.py writes the files) -----------------------------------------------------
    def save_engines(self, tag_dir: Path) -> None:
        for part in self.of_scope(ENGINE):
            part.obj.save(tag_dir)

    def shared_state(self) -> dict:
        state: dict = {}
        for part in self.of_scope(SHARED):
            *parents, leaf = part.name.split(".")
            node = state
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = part.obj.state_dict()
        return state

    def rank_state(self) -> dict:
        return {part.name: part.obj.state_dict() for part in self.of_scope(RANK)}

    # --- resume ------------------------------------------------------------------------------------------
    def load(self, tag_dir: Path, saved: dict) -> list[str]:
        """Every part from the tag folder; `saved` is its mokd_state.pt. Returns what to tell the user."""
        notes = [part.obj.load(tag_dir, saved.get("world_size")) for part in self.of_scope(ENGINE)]
        for part in self.of_scope(SHARED):
            part.obj.load_state_dict(lookup(saved, part.name, tag_dir))
        rank_file = Path(tag_dir) / checkpoint.rank_file_name(dist.rank())
        if saved.get("world_size") == dist.world_size() and rank_file.is_file():
            ranks = torch.load(rank_file, map_location="cpu", weights_only=True)
            for part in self.of_scope(RANK):
                part.obj.load_state_dict(ranks.get(part.name))
        else:
            self.load_rank_parts_of_all(tag_dir, saved.get("world_size"))
        return [note for note in notes if note]

    def load_rank_parts_of_all(self, tag_dir: Path, saved_world_size: int | None) -> None:
        """Another world size: a RANK part that can take every saved rank's state (the data streams' unread
        samples) gets them all, in rank order; the others (the RNG) keep what the step seeded."""
        takers = [part for part in self.of_scope(RANK) if hasattr(part.obj, "load_state_dicts_of_ranks")]
        files = [Path(tag_dir) / checkpoint.rank_file_name(rank) for rank in range(saved_world_size or 0)]
        if not takers or not files or not all(path.is_file() for path in files):
            return
        ranks = [torch.load(path, map_location="cpu", weights_only=True) for path in files]
        for part in takers:
            part.obj.load_state_dicts_of_ranks([rank.get(part.name) for rank in ranks])


def lookup(saved: dict, name: str, tag_dir: Path):
    node = saved
    for key in name.split("."):
        if not isinstance(node, dict) or key not in node:
            raise CheckpointError(f"{Path(tag_dir) / checkpoint.STATE_FILE} holds no {name!r}: it was written for "
                                  f"another set of networks (this run has a part {name!r}); resume it with its "
                                  f"own recipe, or start afresh with --resume none in a new output_dir")
        node = node[key]
    return node


class Progress:
    """The optimizer steps done: a checkpoint's `step`."""

    def __init__(self, step: int = 0):
        self.step = step

    def state_dict(self) -> int:
        return self.step

    def load_state_dict(self, step: int) -> None:
        self.step = int(step)


class ProcessRng:
    """Every generator this process draws from, in types torch.load(weights_only=True) accepts."""

    def state_dict(self) -> dict:
        name, keys, position, has_gauss, cached = np.random.get_state()
        state = {"python": random.getstate(), "torch": torch.get_rng_state(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        name, keys, position, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class EngineFiles:
    """A Learner's DeepSpeed engine: student weights and the (sharded) optimizer state, in its own folder."""

    def __init__(self, learner):
        self.learner = learner

    def save(self, tag_dir: Path) -> None:
        self.learner.save_engine(tag_dir)

    def load(self, tag_dir: Path, saved_world_size: int | None) -> str:
        learner, name = self.learner, self.learner.name
        if checkpoint.resume_plan(saved_world_size, learner.zero_stage) == checkpoint.ENGINE:
            learner.load_engine(tag_dir)
            return f"network {name}: weights and {learner.net_cfg.optimizer} state loaded"
        try:
            learner.load_resharded(tag_dir, lambda: checkpoint.student_weights(tag_dir, name))
        except LayoutError as error:
            raise CheckpointError(f"network {name}: its ZeRO-{learner.zero_stage} state saved by {saved_world_size} "
                                  f"ranks cannot be re-cut for {dist.world_size()}: {error}. Resume on "
                                  f"{saved_world_size} ranks, or start afresh with --resume none in a new "
                                  f"output_dir") from error
        return (f"network {name}: weights and {learner.net_cfg.optimizer} state re-sharded from "
                f"{saved_world_size} ranks onto {dist.world_size()}")


def run_state(learners: dict, loader, progress: Progress) -> RunState:
    """The parts of a training run, in the layout earlier versions wrote (their checkpoints resume)."""
    state = RunState()
    for name, learner in learners.items():
        state.register(name, EngineFiles(learner), ENGINE)
        state.register(f"teachers.{name}", learner.teacher)
        state.register(f"centers.{name}", learner.centers)
    state.register("step", progress)
    state.register("rng", ProcessRng(), RANK)
    if loader is not None:  # tools that save weights without a data stream
        state.register("data", loader, RANK)
    return state
