"""Weights a network starts from (`networks.X.init`): state dicts read from timm's files, matched to the
network's own keys strictly, and loaded into a student before its teacher copies it.

What this module reads: a timm model folder (a `mokd-export` folder, or any folder with timm's
`model.safetensors` / `pytorch_model.bin`) and a timm state dict file (`.safetensors`, `.pth`, `.pt`,
`.bin`; a `state_dict` / `model` / `module` wrapper and a `module.` prefix are taken off). A checkpoint
of this package is read by mokd_scale/train/init_weights.py through train/checkpoint.py, the only reader
of checkpoints. Nothing is ever downloaded.

A timm file may carry the classifier of the model it was trained with; MOKD's backbones have none
(num_classes=0), so the classifier's keys, as timm's own `pretrained_cfg["classifier"]` names them,
are dropped and the caller says so. Every other key must match the network's keys and shapes exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

BACKBONE_PREFIX = "backbone.model."
# Files of a timm model folder, in the order timm itself prefers them.
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
STATE_FILE_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Keys under which training scripts keep the model's state dict inside a larger checkpoint.
STATE_WRAPPERS = ("state_dict", "model", "module")
SHOWN = 5  # names listed per kind of mismatch


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit; the message says why (the caller adds the key)."""


class InitialWeights(NamedTuple):
    """What a network starts from: `state` has the keys of the backbone's timm model (`with_heads`
    False) or of the whole MokdNetwork (True)."""
    state: dict[str, torch.Tensor]
    with_heads: bool
    source: str  # what was read, for the log: "mokd-export folder X (arch)", ...
    notes: tuple[str, ...] = ()  # what the user should know (a classifier dropped)


def backbone_state_dict(network_state: dict) -> dict:
    """Full-network keys -> timm keys: keep `backbone.model.*` and strip that prefix."""
    result = {}
    for key, value in network_state.items():
        key = key.removeprefix("module.")  # engine saves may keep the DDP-style prefix
        if key.startswith(BACKBONE_PREFIX):
            result[key[len(BACKBONE_PREFIX):]] = value
    if not result:
        raise WeightsError(f"no '{BACKBONE_PREFIX}*' keys in the saved network (found e.g. "
                           f"{list(network_state)[:3]}): not a mokd_scale MokdNetwork state")
    return result


# ------------------------------------------------------------------------------------------- reading
def folder_weights_file(folder: Path) -> Path | None:
    """The weights file of a timm model folder (a mokd-export folder is one), or None."""
    for name in FOLDER_WEIGHTS:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def folder_config(folder: Path) -> dict:
    """A timm model folder's config.json ({} when absent or unreadable): `architecture`, `model_args`, ..."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A timm state dict file -> {name: tensor}; tensors only (torch.load runs with weights_only=True,
    so a file is never code)."""
    path = Path(path)
    if path.suffix not in STATE_FILE_SUFFIXES:
        raise WeightsError(f"{path} is not a weights file this package reads ({', '.join(STATE_FILE_SUFFIXES)})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            loaded = load_file(str(path))
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise several types for a bad file
        raise WeightsError(f"cannot read {path} as a state dict of tensors: {first_line(error)}") from None
    return unwrapped(loaded, path)


def unwrapped(loaded, path: Path) -> dict[str, torch.Tensor]:
    """The model's tensors out of a training script's checkpoint ({'state_dict': ...}, 'module.' keys)."""
    for wrapper in STATE_WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict) and not is_state(loaded):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not loaded or not is_state(loaded):
        found = sorted(loaded)[:SHOWN] if isinstance(loaded, dict) else type(loaded).__name__
        raise WeightsError(f"{path} holds no state dict of tensors (found {found}); save the model's "
                           "model.state_dict() (torch.save or safetensors)")
    if all(key.startswith("module.") for key in loaded):
        loaded = {key.removeprefix("module."): value for key, value in loaded.items()}
    return loaded


def is_state(value: dict) -> bool:
    return all(isinstance(key, str) and isinstance(tensor, torch.Tensor) for key, tensor in value.items())


def without_classifier(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict, list[str]]:
    """`state` without the keys of timm's classifier that `model` (built with num_classes=0) lacks,
    and the names dropped."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    own = set(model.state_dict())
    dropped = [key for key in state if key not in own and any(key.startswith(f"{head}.") for head in heads)]
    return {key: value for key, value in state.items() if key not in dropped}, dropped


# ------------------------------------------------------------------------------------------ matching
class Mismatch(NamedTuple):
    missing: list[str]  # the network's keys the weights lack
    unexpected: list[str]  # keys of the weights the network lacks
    reshaped: list[str]  # "name: weights (shape), network (shape)"

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.reshaped)

    def describe(self, expected: int) -> str:
        """'3 of the network's 126 tensors missing (a, b, c); 2 unexpected (d, e); ...'"""
        parts = []
        for what, names in ((f"of the network's {expected} tensors missing", self.missing),
                            ("unexpected", self.unexpected), ("of another shape", self.reshaped)):
            if names:
                more = f", ... {len(names) - SHOWN} more" if len(names) > SHOWN else ""
                parts.append(f"{len(names)} {what} ({', '.join(names[:SHOWN])}{more})")
        return "; ".join(parts)


def mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> Mismatch:
    """Strict comparison of names and shapes (expected may live on the meta device)."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [f"{key}: weights {tuple(given[key].shape)}, network {tuple(value.shape)}"
                for key, value in expected.items() if key in given and given[key].shape != value.shape]
    return Mismatch(missing, unexpected, reshaped)


def target_of(network: nn.Module, with_heads: bool) -> nn.Module:
    """The module an InitialWeights' state is keyed for: the whole network, or its timm backbone."""
    return network if with_heads else network.backbone.model


@torch.no_grad()
def load_initial_weights(network: nn.Module, initial: InitialWeights) -> None:
    """Strict: every tensor of the target comes from `initial` (matched beforehand by the caller).
    Values are copied into the network's own dtype and device."""
    target_of(network, initial.with_heads).load_state_dict(initial.state, strict=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
