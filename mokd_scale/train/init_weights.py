"""`networks.X.init`: the weights network X starts from, read and matched to its keys before any
process group starts (train/cli.py) and again when the run builds its Learners (train/loop.py).

PATH is one of
- a checkpoint of this package (a run folder, its checkpoints/ folder, a step_XXXXXXXX folder or that
  folder's mokd_state.pt): network X's EMA teacher, its backbone alone, or with `init_heads: true` the
  whole network with its projection and search heads (the heads must have the same shapes);
- a timm model folder: a `mokd-export` folder (model.safetensors + config.json) or the like;
- a timm state dict file of X's architecture (.safetensors, .pth, .pt, .bin), a classifier in it dropped.

The student is loaded and its teacher then copies it (engine/learner.py::build_student_and_teacher), so
both start from PATH. The match is strict: any missing, unexpected or reshaped tensor is a ConfigError
naming `networks.X.init` with the counts, the first names and what to change. Nothing is downloaded.
A resumed run ignores init: its checkpoint's weights win, and the run says so once.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from mokd_scale.config import Config, ConfigError
from mokd_scale.models.backbone import timm_kwargs
from mokd_scale.models.network import build_network, pair_search_dim
from mokd_scale.models.weights import (InitialWeights, WeightsError, backbone_state_dict, folder_config,
                                       folder_weights_file, mismatch, read_state_file, target_of, without_classifier)
from mokd_scale.train import checkpoint
from mokd_scale.train.manifest import MANIFEST

FORMATS = ("a mokd-export folder, a timm model.safetensors / .pth state dict of this architecture, or a checkpoint "
           "of this package (run folder, checkpoints/ or step_XXXXXXXX)")


class Read(NamedTuple):
    """Weights as read, before matching: `origin` says what architecture they record, if anything does."""
    state: dict[str, torch.Tensor]
    with_heads: bool
    source: str
    origin: str
    from_checkpoint: bool


def initial_weights(config: Config, name: str, search_dim: int | None = None) -> InitialWeights | None:
    """Network `name`'s starting weights, matched to its keys (None without init). Raises ConfigError."""
    net = config.networks[name]
    if not net.init:
        return None
    key = f"networks.{name}.init"
    path = Path(net.init).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}: {path} does not exist; give {FORMATS}")
    try:
        read = read_weights(path, name, net.init_heads)
    except (WeightsError, checkpoint.CheckpointError) as error:
        raise ConfigError(f"{key}: {error}") from None
    if net.init_heads and not read.from_checkpoint:
        raise ConfigError(f"networks.{name}.init_heads: {read.source} holds a backbone only; heads come from a "
                          f"checkpoint of this package (set {key} to one, or init_heads=false for fresh heads)")
    return matched(config, name, read, search_dim)


def read_weights(path: Path, name: str, with_heads: bool) -> Read:
    tag_dir = checkpoint_tag(path)
    if tag_dir is not None:
        return read_checkpoint(tag_dir, name, with_heads)
    if path.is_dir():
        weights = folder_weights_file(path)
        if weights is None:
            raise WeightsError(f"{path} is a folder but neither a timm model folder (no model.safetensors) nor a "
                               f"checkpoint of this package; give {FORMATS}")
        recorded = folder_config(path)
        arch = recorded.get("architecture")
        origin = f"its config.json records {arch} with model_args {recorded.get('model_args') or {}}" if arch else ""
        return Read(read_state_file(weights), False, f"timm model folder {path}" + (f" ({arch})" if arch else ""),
                    origin, False)
    return Read(read_state_file(path), False, f"state dict file {path}", "", False)


def checkpoint_tag(path: Path) -> Path | None:
    """The tag folder when `path` is a checkpoint of this package (find_tag checks it), else None."""
    if path.is_file():
        return checkpoint.find_tag(path.parent) if path.name == checkpoint.STATE_FILE else None
    marks = ((path / checkpoint.STATE_FILE).is_file() or (path / MANIFEST).is_file()
             or checkpoint.read_latest(path) is not None or checkpoint.tags_in(path) or (path / "checkpoints").is_dir())
    return checkpoint.find_tag(path) if marks else None


def read_checkpoint(tag_dir: Path, name: str, with_heads: bool) -> Read:
    state = checkpoint.read_state(tag_dir)
    teachers = state.get("teachers", {})
    if name not in teachers:
        raise WeightsError(f"checkpoint {tag_dir} holds networks {sorted(teachers)}, not {name!r}; init takes the "
                           f"network of the same name: to start from another, export it (mokd-export --checkpoint "
                           f"{tag_dir} --network N --out DIR) and set networks.{name}.init=DIR")
    saved = (state.get("config") or {}).get("networks", {}).get(name, {})
    origin = f"that run's networks.{name} was {saved.get('arch')} with arch_kwargs {saved.get('arch_kwargs') or {}}"
    weights = teachers[name] if with_heads else backbone_state_dict(teachers[name])
    what = "teacher with its heads" if with_heads else "teacher's backbone"
    return Read(weights, with_heads, f"network {name}'s {what} at step {state.get('step')} of {tag_dir}",
                origin if saved else "", True)


def matched(config: Config, name: str, read: Read, search_dim: int | None) -> InitialWeights:
    """`read` checked against network `name` as this recipe builds it (on the meta device)."""
    with torch.device("meta"):
        network = build_network(config, name, teacher=True,
                                search_dim=pair_search_dim(config) if search_dim is None else search_dim)
    target = target_of(network, read.with_heads)
    state, dropped = (read.state, []) if read.with_heads else without_classifier(read.state, target)
    expected = target.state_dict()
    problems = mismatch(expected, state)
    if problems:
        raise ConfigError(mismatch_message(config, name, read, problems.describe(len(expected))))
    notes = (f"dropped the classifier's {len(dropped)} tensors ({', '.join(dropped)}): MOKD's backbones have "
             "none",) if dropped else ()
    return InitialWeights(state, read.with_heads, read.source, notes)


def mismatch_message(config: Config, name: str, read: Read, counts: str) -> str:
    net, key = config.networks[name], f"networks.{name}"
    built = f"timm.create_model({net.arch!r}, num_classes=0, **{timm_kwargs(net.arch, net.arch_kwargs)})"
    if read.with_heads:
        advice = (f"The heads' shapes follow mokd.out_dim, proj_hidden_dim, proj_bottleneck_dim, search_dim, "
                  f"search_depth, {key}.proj_batchnorm and data.global_crop_size (the search head's position grid): "
                  f"set them as that run did, or set {key}.init_heads=false to start the heads afresh")
    else:
        advice = (f"Set {key}.arch and {key}.arch_kwargs to the architecture the weights are of, or point {key}.init "
                  f"at weights of {net.arch}")
    origin = f" ({read.origin})" if read.origin else ""
    return (f"{key}.init: the weights of {read.source} do not fit {key}, built as {built}: {counts}. "
            f"{advice}{origin}")


def check_initial_weights(config: Config, resume: str) -> None:
    """Before any process group: every network's init reads and matches (skipped when the run will
    resume, since the checkpoint's weights win then)."""
    if resume_expected(config, resume):
        return
    for name in config.networks:
        initial_weights(config, name)


def resume_expected(config: Config, resume: str) -> bool:
    """--resume PATH, or auto with a committed checkpoint in the run folder (train/loop.py decides)."""
    if resume == "none":
        return False
    if resume != "auto":
        return True
    return checkpoint.read_latest(Path(config.output_dir) / "checkpoints") is not None


def start_message(name: str, initial: InitialWeights) -> str:
    what = "student, teacher and heads" if initial.with_heads else "student and teacher backbones"
    return f"networks.{name}: {what} start from {initial.source}" + "".join(f"; {note}" for note in initial.notes)
