"""Save / resume / prune. A checkpoint is whole or absent (docs/design.md, invariant 6).

Layout of OUTPUT/checkpoints/:
    latest                      the newest complete tag; written last, by atomic rename
    step_00001234/a/            network a's DeepSpeed engine (tag folder "a")
    step_00001234/b/            network b's engine (own folder: two engines must not share one)
    step_00001234/mokd_state.pt teachers (fp32), centres, step, world size, resolved config
    step_00001234/rng_rank{r}.pt  per-rank RNG states
A crash anywhere before `latest` is replaced leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mokd_scale import dist

LATEST = "latest"
STATE_FILE = "mokd_state.pt"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(checkpoint_dir: Path) -> str | None:
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag or None


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Atomic: a reader sees the old tag or the new one, never a torn file."""
    tmp = checkpoint_dir / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as handle:
        handle.write(tag + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, checkpoint_dir / LATEST)


def save_checkpoint(checkpoint_dir: Path, step: int, learners: dict, extra_state: dict, keep_last: int) -> str:
    """Collective: every rank calls it at the same step. Returns the tag."""
    tag = tag_for(step)
    tag_dir = Path(checkpoint_dir) / tag
    for name, learner in learners.items():
        learner.engine.save_checkpoint(str(tag_dir), tag=name, save_latest=False)
        kill_here_for_tests(step)
    torch.save(rng_state(), tag_dir / f"rng_rank{dist.rank()}.pt")
    if dist.rank() == 0:
        state = {**extra_state, "step": step, "world_size": dist.world_size(),
                 "teachers": {name: learner.teacher.state_dict() for name, learner in learners.items()},
                 "centers": {name: learner.centers.state_dict() for name, learner in learners.items()}}
        save_atomically(state, tag_dir / STATE_FILE)
    dist.barrier()  # every rank's files are on disk before the pointer moves
    if dist.rank() == 0:
        write_latest(Path(checkpoint_dir), tag)
        prune(Path(checkpoint_dir), keep_last)
    dist.barrier()
    return tag


def kill_here_for_tests(step: int) -> None:
    """Fault injection: MOKD_TEST_KILL_IN_SAVE=<step> dies by SIGKILL between the two engines' saves."""
    if os.environ.get("MOKD_TEST_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), 9)


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete tags; never the one `latest` names; drop stale partial tags."""
    latest = read_latest(checkpoint_dir)
    tags = sorted(p.name for p in checkpoint_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    complete = [t for t in tags if (checkpoint_dir / t / STATE_FILE).is_file()]
    keep = set(complete[-keep_last:]) | {latest}
    newest_complete = complete[-1] if complete else ""
    for tag in tags:
        # A partial tag older than the newest complete one is a crashed save: safe to remove.
        if tag not in keep and (tag in complete or tag < newest_complete):
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def resolve_resume(resume: str, checkpoint_dir: Path) -> Path | None:
    """--resume auto|none|PATH → the tag folder to load, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        tag = read_latest(checkpoint_dir)
        return checkpoint_dir / tag if tag else None
    path = Path(resume)
    if (path / STATE_FILE).is_file():
        return path
    tag = read_latest(path)
    if tag:
        return path / tag
    raise FileNotFoundError(f"--resume {resume!r}: neither a checkpoint tag folder (with {STATE_FILE}) nor a "
                            f"checkpoints folder with a '{LATEST}' file")


def load_state(tag_dir: Path) -> dict:
    """MOKD state of a checkpoint (our own files only: torch.load unpickles)."""
    return torch.load(tag_dir / STATE_FILE, map_location="cpu", weights_only=False)


ENGINE, UNIVERSAL, WEIGHTS_ONLY = "engine", "universal", "weights_only"


def resume_plan(state: dict, zero_stage: int, optimizer: str) -> str:
    """How to load one engine. ZeRO optimizer state is partitioned by the saving world size:
    another size loads DeepSpeed's universal copy (Adam-family only) or fp32 weights alone."""
    if zero_stage == 0 or state.get("world_size") == dist.world_size():
        return ENGINE
    return UNIVERSAL if optimizer == "adamw" else WEIGHTS_ONLY


def restore(tag_dir: Path, learners: dict, state: dict, plans: dict[str, str]) -> None:
    """Load engines (per plan), teachers, centres and, at the same world size, this rank's RNG."""
    for name, learner in learners.items():
        plan = plans.get(name, ENGINE)
        if plan != WEIGHTS_ONLY:  # weights-only students were loaded before deepspeed.initialize
            engine_tag = universal_dir_name(name) if plan == UNIVERSAL else name
            path, _ = learner.engine.load_checkpoint(str(tag_dir), tag=engine_tag, load_lr_scheduler_states=False)
            if path is None:
                raise FileNotFoundError(f"checkpoint {tag_dir} has no engine state for network {name}")
        learner.teacher.load_state_dict(state["teachers"][name])
        learner.centers.load_state_dict(state["centers"][name])
    rng_file = tag_dir / f"rng_rank{dist.rank()}.pt"
    if state.get("world_size") == dist.world_size() and rng_file.is_file():
        restore_rng(torch.load(rng_file, weights_only=False))


def consolidated_student(tag_dir: Path, name: str) -> dict:
    """fp32 student weights rebuilt from any ZeRO stage's shards (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag=name)

def universal_dir_name(name: str) -> str:
    return f"{name}_universal"


def convert_to_universal(tag_dir: Path, name: str) -> None:
    """DeepSpeed's converter, once (rank 0), for a resume onto a different number of ranks."""
    target = tag_dir / universal_dir_name(name)
    if dist.rank() == 0 and not (target / ".complete").exists():
        command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                   "--input_folder", str(tag_dir / name), "--output_folder", str(target), "--num_extract_workers", "1",
                   "--num_merge_workers", "1", "--inject_missing_state"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {tag_dir / name} to a universal checkpoint failed; run by hand:\n  "
                               f"{' '.join(command)}\n{result.stderr[-2000:]}")
        (target / ".complete").touch()
    dist.barrier()


# ------------------------------------------------------------------ readers for tools (eval, export)
class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


def tags_in(checkpoint_dir: Path) -> list[str]:
    """Tag folder names, oldest first (the zero-padded step sorts as text)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    return sorted(p.name for p in Path(checkpoint_dir).iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def find_tag(path: str | Path, tag: str | None = None) -> Path:
    """A run folder, its checkpoints folder or a tag folder, and optionally a tag (step_XXXXXXXX or a
    step number; default: `latest`) -> the tag folder."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist: pass OUTPUT/checkpoints of a run")
    if tag is None and (root / STATE_FILE).is_file():
        return root
    if read_latest(root) is None and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            raise CheckpointError(f"{root} has no '{LATEST}' file, so no checkpoint was completed there; "
                                  f"pass a tag, one of {tags_in(root)}")
    if tag.isdigit():
        tag = tag_for(int(tag))
    if not (root / tag / STATE_FILE).is_file():
        raise CheckpointError(f"checkpoint {root / tag} not found or incomplete; available tags: {tags_in(root)}")
    return root / tag


def read_state(tag_dir: Path) -> dict:
    """The MOKD state (step, world size, resolved config, teachers, centres) of a tag."""
    return load_state(tag_dir)


def teacher_weights(tag_dir: Path, network: str, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The fp32 EMA teacher of `network` (the full MokdNetwork state dict)."""
    teachers = (state or read_state(tag_dir)).get("teachers", {})
    if network not in teachers:
        raise CheckpointError(f"unknown network {network!r}: {tag_dir} holds {sorted(teachers)}")
    return teachers[network]


def student_weights(tag_dir: Path, network: str) -> dict[str, torch.Tensor]:
    """fp32 student weights from the network's DeepSpeed save, any ZeRO stage (shards are merged)."""
    engine_dir = Path(tag_dir) / network
    if not engine_dir.is_dir():
        raise CheckpointError(f"{engine_dir} not found: no DeepSpeed save of network {network!r} in {tag_dir}")
    if list(engine_dir.glob("*zero_pp_rank_*optim_states.pt")):
        return consolidated_student(tag_dir, network)
    model_file = engine_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise CheckpointError(f"{engine_dir} holds neither ZeRO shards nor mp_rank_00_model_states.pt")
    # ZeRO stage 0: the whole module is in DeepSpeed's model-states file (a pickle: trusted files only).
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]
