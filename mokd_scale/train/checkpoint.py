"""The files of a checkpoint: save, verify, choose what to resume, prune, read. A checkpoint is whole or
absent (docs/design.md, invariant 6). What goes into the files is the run's registry of parts
(train/state.py): this module writes and checks files, whatever the parts are.

Layout of OUTPUT/checkpoints/:
    latest                       the newest complete tag; written last, by atomic rename
    step_00001234/a/             network a's DeepSpeed engine (an ENGINE part: its own folder, since two
    step_00001234/b/             engines must not share one)
    step_00001234/mokd_state.pt  the SHARED parts (teachers.X fp32, centers.X, step), world size, resolved config
    step_00001234/rank{r}.pt     rank r's RANK parts (RNG states, data-stream position)
    step_00001234/manifest.json  every file above with its size; checksums of MOKD's own files
A crash anywhere before `latest` is replaced leaves the previous checkpoint in charge. Resume checks a
tag against its manifest before trusting it, and falls back to the newest intact earlier tag.

Trust: DeepSpeed reads its engine files with torch.load(weights_only=False), which runs whatever code
a crafted file carries; resume only checkpoints you (or your jobs) wrote. MOKD's own files load with
weights_only=True.

This module is the only reader of checkpoint files: training resumes through choose_resume and
load_state (then RunState.load), tools read through find_tag, read_state, teacher_weights and
student_weights.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

from mokd_scale.runtime import dist
from mokd_scale.runtime import faults
from mokd_scale.train import manifest
from mokd_scale.train.manifest import MANIFEST

LATEST = "latest"
STATE_FILE = "mokd_state.pt"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
GIB = 1024 ** 3


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""


class CheckpointWriteFailed(RuntimeError):
    """A save failed on some rank and was abandoned; raised on every rank alike. The previous
    checkpoint and `latest` are untouched."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank{rank}.pt"


def read_latest(checkpoint_dir: Path) -> str | None:
    pointer = Path(checkpoint_dir) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    return tag or None


def write_latest(checkpoint_dir: Path, tag: str) -> None:
    """Atomic: a reader sees the old tag or the new one, never a torn file."""
    manifest.write_text_atomically(Path(checkpoint_dir) / LATEST, tag + "\n")


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}{manifest.TEMPORARY_MARK}{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


def tags_in(checkpoint_dir: Path) -> list[str]:
    """Tag folder names, oldest first (the zero-padded step sorts as text)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    return sorted(p.name for p in Path(checkpoint_dir).iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


# ----------------------------------------------------------------------------------------- save
def save_checkpoint(checkpoint_dir: Path, step: int, state, meta: dict, keep_last: int) -> str:
    """Collective: every rank calls it at the same step, with the run's RunState (train/state.py) and
    `meta` for mokd_state.pt beside the parts (the resolved config). Returns the tag.

    Every rank writes its files and reports the outcome; rank 0 then writes the manifest and moves
    `latest`, and the ranks leave together, so a rank that exits right after this returns never cuts
    another rank's write short. A failed write anywhere raises CheckpointWriteFailed on every rank."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag_for(step)
    tag_dir = checkpoint_dir / tag
    clear_interrupted_save(checkpoint_dir, tag)
    errors: list[str] = []
    for part in state.of_scope("engine"):
        with write_errors_recorded(part.obj.learner.engine, step, errors):
            part.obj.save(tag_dir)
        faults.between_engine_saves(step)
    faults.before_rank_files(step)
    shared = {**meta, "world_size": dist.world_size(), **state.shared_state()} if dist.rank() == 0 else None
    digests = write_own_files(tag_dir, step, shared, state.rank_state(), errors)
    reports = dist.all_gather_object((first_of(errors), manifest.list_files(tag_dir), digests))  # all written
    errors = [error for report in reports for error in report[0]]
    if not errors and dist.rank() == 0:
        errors = commit(checkpoint_dir, tag, step, reports, keep_last)
    errors = dist.broadcast_object(errors)
    if errors:
        if dist.rank() == 0 and read_latest(checkpoint_dir) != tag:
            shutil.rmtree(tag_dir, ignore_errors=True)  # give back the space the failed save took
        raise CheckpointWriteFailed(describe_failure(checkpoint_dir, tag, errors))
    return tag


def clear_interrupted_save(checkpoint_dir: Path, tag: str) -> None:
    """Files of an earlier, interrupted save of the same tag (another world size, say) must not end
    up in the new tag's manifest."""
    if dist.rank() == 0 and (checkpoint_dir / tag).exists() and read_latest(checkpoint_dir) != tag:
        shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)
    dist.barrier()


@contextlib.contextmanager
def write_errors_recorded(engine, step: int, errors: list[str]):
    """DeepSpeed's save runs collectives between its writes: a rank whose write raised would leave the
    others waiting in the next one until the collective timeout. During the save, a write that fails
    (a full disk) is recorded instead, and the ranks agree on the outcome afterwards."""
    writers = [(engine.checkpoint_engine, "makedirs", 0), (engine.checkpoint_engine, "save", 1),
               (engine, "_copy_recovery_script", 0)]  # (object, method, index of its path argument)
    patched = []
    for owner, name, path_index in writers:
        if hasattr(owner, name):
            patched.append((owner, name, vars(owner).get(name)))  # None: the class's method
            setattr(owner, name, recording_errors(getattr(owner, name), path_index, step, errors))
    try:
        yield
    finally:
        for owner, name, own in patched:
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)


def recording_errors(write, path_index: int, step: int, errors: list[str]):
    def guarded(*args, **kwargs):
        path = args[path_index] if len(args) > path_index else kwargs.get("path", "?")
        try:
            faults.before_checkpoint_write(step, path)
            return write(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
            errors.append(write_error(path, error))
    return guarded


def first_of(errors: list[str]) -> list[str]:
    """One rank's first failure says what went wrong; the ones after it mostly follow from it."""
    if len(errors) <= 1:
        return errors
    return [f"{errors[0]} (and {len(errors) - 1} more writes on rank {dist.rank()})"]


def write_error(path, error: Exception) -> str:
    return f"rank {dist.rank()}: writing {path} failed: {type(error).__name__}: {error}"


def write_own_files(tag_dir: Path, step: int, shared: dict | None, rank_state: dict,
                    errors: list[str]) -> dict[str, str]:
    """This rank's file, and on rank 0 the shared state. Returns name -> sha256."""
    files = {rank_file_name(dist.rank()): rank_state}
    if shared is not None:
        files[STATE_FILE] = shared
    digests = {}
    for name, obj in files.items():
        try:
            faults.before_checkpoint_write(step, tag_dir / name)
            save_atomically(obj, tag_dir / name)
            digests[name] = manifest.sha256_of(tag_dir / name)
        except Exception as error:  # noqa: BLE001 - as above
            errors.append(write_error(tag_dir / name, error))
    return digests


def commit(checkpoint_dir: Path, tag: str, step: int, reports: list, keep_last: int) -> list[str]:
    """Rank 0, once every rank's files are written: manifest, then `latest`, then prune."""
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    for _, listing, own_digests in reports:
        for name, size in listing.items():  # a rank may see another node's file late, never larger
            sizes[name] = max(size, sizes.get(name, 0))
        digests.update(own_digests)
    try:
        manifest.write_manifest(checkpoint_dir / tag, step, sizes, digests)
        write_latest(checkpoint_dir, tag)
    except OSError as error:
        return [write_error(checkpoint_dir / tag / MANIFEST, error)]
    prune(checkpoint_dir, keep_last)
    return []


def describe_failure(checkpoint_dir: Path, tag: str, errors: list[str]) -> str:
    latest = read_latest(checkpoint_dir)
    free = shutil.disk_usage(checkpoint_dir).free / GIB if checkpoint_dir.exists() else 0.0
    needed = manifest.total_bytes(checkpoint_dir / latest) / GIB if latest else 0.0
    shown = "\n  ".join(errors[:4]) + (f"\n  ... and {len(errors) - 4} more" if len(errors) > 4 else "")
    return (f"checkpoint {tag} could not be written:\n  {shown}\n"
            f"{free:.1f} GiB free in {checkpoint_dir}; a checkpoint takes about {needed:.1f} GiB. The previous "
            f"checkpoint ({latest or 'none'}) is untouched and `latest` still names it: make room (or move "
            f"output_dir) and start the run again to resume from it.")


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Keep the newest keep_last complete tags; never the one `latest` names; drop stale partial tags."""
    latest = read_latest(checkpoint_dir)
    tags = tags_in(checkpoint_dir)
    complete = [t for t in tags if (checkpoint_dir / t / MANIFEST).is_file()]
    keep = set(complete[-keep_last:]) | {latest}
    newest_complete = complete[-1] if complete else ""
    for tag in tags:
        # A partial tag older than the newest complete one is a crashed save: safe to remove.
        if tag not in keep and (tag in complete or tag < newest_complete):
            shutil.rmtree(checkpoint_dir / tag, ignore_errors=True)


# --------------------------------------------------------------------------------------- resume
def choose_resume(resume: str, checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """--resume auto|none|PATH -> (the tag folder to load, or None for a fresh start; warnings to log).

    Raises CheckpointError when checkpoints exist but none can be trusted: a run never starts from
    scratch over checkpoints it could not read."""
    if resume == "none":
        return None, []
    if resume == "auto":
        return newest_intact(Path(checkpoint_dir))
    path = Path(resume)
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        return explicit_tag(path)
    if read_latest(path) or tags_in(path):
        return newest_intact(path)
    raise CheckpointError(f"--resume {resume!r}: neither a checkpoint tag folder (step_XXXXXXXX) nor a "
                          f"checkpoints folder with a '{LATEST}' file")


def explicit_tag(tag_dir: Path) -> tuple[Path, list[str]]:
    """A tag the user named: used if intact; without a manifest (an older mokd_scale) with a warning."""
    if not (tag_dir / MANIFEST).is_file():
        return tag_dir, [f"{tag_dir} has no {MANIFEST}: it cannot be checked, resuming from it as asked"]
    problems = manifest.verify(tag_dir)
    if problems:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {'; '.join(problems)}. Resume from another "
                              f"tag (--resume {tag_dir.parent}/step_XXXXXXXX) or restore the files.")
    return tag_dir, []


def newest_intact(checkpoint_dir: Path) -> tuple[Path | None, list[str]]:
    """The tag `latest` names if intact, else the newest intact tag before it."""
    latest = read_latest(checkpoint_dir)
    tags = tags_in(checkpoint_dir)
    warnings = []
    if latest is not None and latest not in tags:
        warnings.append(f"{LATEST} names {latest}, which does not exist")
    candidates = [tag for tag in reversed(tags) if latest is None or tag <= latest]
    for tag in candidates:
        problems = manifest.verify(checkpoint_dir / tag)
        if not problems:
            if tag != latest:
                warnings.append(f"resuming from {tag}, the newest intact checkpoint before "
                                f"{latest or 'the missing latest'}")
            return checkpoint_dir / tag, warnings
        warnings.append(f"checkpoint {tag} is not usable: {'; '.join(problems)}")
    if latest is None:  # interrupted saves only: nothing was ever committed here
        if warnings:
            warnings.append("no checkpoint was completed here yet: starting from scratch")
        return None, warnings
    raise CheckpointError(
        f"no usable checkpoint in {checkpoint_dir}:\n  " + "\n  ".join(warnings) +
        "\nNothing was changed. Restore the damaged files, resume from another copy with --resume PATH "
        "(MOKD_RESUME in the job script), or start afresh with --resume none in a new output_dir.")


def load_state(tag_dir: Path) -> dict:
    """MOKD state of a checkpoint: tensors and plain values only, so no code is unpickled."""
    try:
        return torch.load(Path(tag_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises several types for a bad file
        raise CheckpointError(f"cannot read {Path(tag_dir) / STATE_FILE}: {error}") from error


ENGINE, RESHARD = "engine", "reshard"


def resume_plan(saved_world_size: int | None, zero_stage: int) -> str:
    """How to load one engine. ZeRO optimizer state is partitioned by the saving world size: another size
    re-cuts every state key onto its own partitions (engine/reshard.py)."""
    if zero_stage == 0 or saved_world_size == dist.world_size():
        return ENGINE
    return RESHARD


# ---------------------------------------------------------------------------------- for the tools
def find_tag(path: str | Path, tag: str | None = None) -> Path:
    """A run folder, its checkpoints folder or a tag folder, and optionally a tag (step_XXXXXXXX or a
    step number; default: `latest`) -> the tag folder, checked against its manifest."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist: pass OUTPUT/checkpoints of a run")
    if tag is None and ((root / MANIFEST).is_file() or (root / STATE_FILE).is_file()):
        return explicit_tag(root)[0]
    if read_latest(root) is None and (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            raise CheckpointError(f"{root} has no '{LATEST}' file, so no checkpoint was completed there; "
                                  f"pass a tag, one of {tags_in(root)}")
    if tag.isdigit():
        tag = tag_for(int(tag))
    if not (root / tag).is_dir():
        raise CheckpointError(f"checkpoint {root / tag} not found; available tags: {tags_in(root)}")
    return explicit_tag(root / tag)[0]


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
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir), tag=network)
    model_file = engine_dir / "mp_rank_00_model_states.pt"
    if not model_file.exists():
        raise CheckpointError(f"{engine_dir} holds neither ZeRO shards nor mp_rank_00_model_states.pt")
    # ZeRO stage 0: the whole module is in DeepSpeed's model-states file (a pickle: trusted files only).
    return torch.load(model_file, map_location="cpu", weights_only=False)["module"]
