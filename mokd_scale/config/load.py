"""Typed run configuration: a YAML recipe plus `--set key=value` overrides.

A recipe is a packaged name (`tiny_cpu`, see mokd_scale/config/recipes/) or a path to a YAML
file. Every key is checked against the dataclasses below, so a typo fails at start-up
with the list of valid keys instead of being silently ignored.
"""
from __future__ import annotations

import contextlib
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

import re

from mokd_scale.config.schema import Config, NetworkConfig, Networks, help_of

CONFIG_DIR = Path(__file__).parent / "recipes"
# The repository's top-level ds_configs/: a link in a checkout, a copy inside an installed wheel.
DEEPSPEED_DIR = Path(__file__).parent.parent / "ds_configs"


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


# YAML spellings that are Python keywords.
YAML_ALIASES = {"lambda": "lambda_cross"}
YAML_NAMES = {v: k for k, v in YAML_ALIASES.items()}


def recipe_path(name_or_path: str) -> Path:
    """A packaged recipe name (`tiny_cpu`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {name_or_path!r} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"unknown recipe {name_or_path!r}: use one of {names} or a path to a .yaml file")
    return packaged


def add_set_argument(parser, what: str = "recipe fields") -> None:
    """`--set KEY=VALUE ...`, spelled and parsed the same in every command that reads a recipe
    (several pairs after one --set, and --set may repeat)."""
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help=f"override {what}, e.g. --set train.steps=100 networks.a.lr=3e-4")


def deepspeed_json_path(name: str) -> Path:
    """networks.X.deepspeed -> the JSON file: the path as given (absolute, or relative to the working
    directory) if it exists, else the packaged file of that name, so `ds_configs/zero2_bf16.json`
    works from any directory and from an installed wheel."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = DEEPSPEED_DIR / path.name
    if not path.is_absolute() and path.parent in (Path("."), Path("ds_configs")) and packaged.is_file():
        return packaged
    names = sorted(f"ds_configs/{p.name}" for p in DEEPSPEED_DIR.glob("*.json"))
    raise ConfigError(f"DeepSpeed config {name!r} not found (networks.X.deepspeed): give a path to a JSON "
                      f"file or one of the packaged {names}")


def load_config(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Config:
    """Recipe + overrides → validated, frozen Config. Raises ConfigError naming the bad key."""
    raw = yaml.safe_load(recipe_path(name_or_path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {name_or_path!r} must be a YAML mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    config = build_dataclass(Config, raw, prefix="")
    validate(config)
    return config


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value`: value is parsed as YAML (so 3, 1e-4, true, [1, 2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    check_key_path(parts)
    check_network_named(raw, parts)
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = parse_override_value(text)


def parse_override_value(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text  # a plain string such as a path with odd characters


def check_network_named(raw: dict, parts: list[str]) -> None:
    """`networks.NAME.field=...` must name a network of the recipe; a new network is added by setting its
    architecture first (`networks.c.arch=convnext_atto`), so that a misspelt name is not a new network."""
    if len(parts) < 3 or parts[0] != "networks":
        return
    networks = raw.get("networks") or {}
    if parts[1] not in networks and parts[2] != "arch":
        raise ConfigError(f"unknown network {parts[1]!r} in {'.'.join(parts)!r}: the recipe has {list(networks)}; "
                          f"to add a network, set its architecture first: networks.{parts[1]}.arch=...")


def check_key_path(parts: list[str]) -> None:
    """Fail early with the valid keys at the level where a path goes wrong."""
    cls: Any = Config
    for depth, part in enumerate(parts):
        if cls is Networks:  # a network's name, then its fields
            cls = NetworkConfig
            continue
        if not dataclasses.is_dataclass(cls):
            # Below a dict-typed field (arch_kwargs) any key is allowed.
            return
        names = field_names(cls)
        if part not in names:
            where = ".".join(parts[:depth]) or "top level"
            raise ConfigError(f"unknown config key {'.'.join(parts)!r}: valid keys at {where} are {sorted(names)}")
        cls = field_type(cls, YAML_ALIASES.get(part, part))


def field_names(cls) -> set[str]:
    return {YAML_NAMES.get(f.name, f.name) for f in dataclasses.fields(cls)}


def field_type(cls, name: str):
    return typing.get_type_hints(cls)[name]


def build_dataclass(cls, raw: Any, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or 'top level'!r} must be a mapping, got {raw!r}")
    valid = field_names(cls)
    unknown = sorted(set(raw) - valid)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}: valid keys at {where} are {sorted(valid)}")
    values = {}
    for key, value in raw.items():
        name = YAML_ALIASES.get(key, key)
        values[name] = convert(field_type(cls, name), value, prefix + key)
    return cls(**values)


def convert(expected, value: Any, key: str):
    """Convert a YAML value to the field's type, or raise naming key, type and value."""
    if dataclasses.is_dataclass(expected):
        return build_dataclass(expected, value, key + ".")
    if expected is Networks:
        return build_networks(value, key)
    origin = typing.get_origin(expected)
    if origin is typing.Literal:
        allowed = typing.get_args(expected)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        return value
    if origin is tuple:
        return convert_tuple(typing.get_args(expected), value, key)
    if expected is dict or origin is dict:
        if not isinstance(value, dict):
            raise type_error(key, "a mapping", value)
        return dict(value)
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise type_error(key, "true or false", value)
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise type_error(key, "an integer", value)
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise type_error(key, "a number", value)
    if expected is str:
        if isinstance(value, (dict, list)):
            raise type_error(key, "a string", value)
        return "" if value is None else str(value)
    raise ConfigError(f"config key {key!r} has an unsupported type {expected}")


# A network's name starts metrics keys (`a.loss`) and TensorBoard tags (`train/a/loss`): a word, and none
# of the other keys' first parts.
NETWORK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RESERVED_NAMES = {"knn", "lr", "wd", "teacher_temperature", "teacher_momentum", "images_per_s", "seconds_per_step",
                  "peak_memory_gib", "skipped_samples", "step", "grad", "perf", "sched", "train", "data"}


def build_networks(value: Any, key: str) -> Networks:
    if isinstance(value, Networks):
        return value
    if not isinstance(value, dict) or not value:
        raise type_error(key, "a mapping from network names to their settings (at least one network)", value)
    for name in value:
        if not isinstance(name, str) or not NETWORK_NAME.match(name) or name in RESERVED_NAMES:
            raise ConfigError(f"config key {key}.{name}: a network's name must be a word of letters, digits and "
                              f"'_' starting with a letter, and none of {sorted(RESERVED_NAMES)}")
    return Networks({name: build_dataclass(NetworkConfig, settings, f"{key}.{name}.")
                     for name, settings in value.items()})


def convert_tuple(item_types: tuple, value: Any, key: str) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
        raise type_error(key, f"a list of {len(item_types)} numbers", value)
    return tuple(convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(item_types, value)))


def type_error(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config key {key!r} expects {expected}, got {value!r}")


def validate(config: Config, world_size: int | None = None) -> None:
    """Checks between fields. With world_size, also the batch split across ranks."""
    data, train = config.data, config.train
    if data.source == "shards" and not data.train_shards:
        raise ConfigError("data.train_shards is empty: set it to an index JSON or brace pattern from mokd-shards "
                          "(or use data.source=synthetic)")
    if data.local_crop_size >= data.global_crop_size:
        raise ConfigError(f"data.local_crop_size ({data.local_crop_size}) must be smaller than "
                          f"data.global_crop_size ({data.global_crop_size})")
    for name in ("global_batch_size", "micro_batch_size", "steps", "log_every", "checkpoint_every", "keep_last"):
        if getattr(train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1, got {getattr(train, name)}")
    if train.term_gradients_every < 0:
        raise ConfigError(f"train.term_gradients_every must be >= 0 (0: off), got {train.term_gradients_every}")
    if train.collective_timeout_s <= 0:
        raise ConfigError(f"train.collective_timeout_s must be positive seconds, got {train.collective_timeout_s}")
    if train.global_batch_size % train.micro_batch_size:
        raise ConfigError(f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
                          f"train.micro_batch_size ({train.micro_batch_size})")
    if data.samples_per_epoch < train.global_batch_size:
        raise ConfigError(f"data.samples_per_epoch ({data.samples_per_epoch}) must be at least "
                          f"train.global_batch_size ({train.global_batch_size})")
    if train.knn_every and not data.val_shards:
        raise ConfigError("train.knn_every > 0 needs data.val_shards (and data.knn_train_shards or "
                          "data.train_shards) pointing at shards from mokd-shards")
    for name, net in config.networks.items():
        validate_network(net, f"networks.{name}")
        validate_schedule_owner(config, name)
    validate_term_weights(config)
    if world_size is not None:
        validate_world_size(config, world_size)


def validate_network(net: NetworkConfig, key: str) -> None:
    if net.clip_grad < 0:
        raise ConfigError(f"{key}.clip_grad must be >= 0 (0 disables clipping), got {net.clip_grad}")
    if net.warmup_teacher_temperature_epochs < 0:
        raise ConfigError(f"{key}.warmup_teacher_temperature_epochs must be >= 0, "
                          f"got {net.warmup_teacher_temperature_epochs}")
    if not net.deepspeed:
        raise ConfigError(f"{key}.deepspeed must name a DeepSpeed JSON (see ds_configs/)")
    if net.init_heads and not net.init:
        raise ConfigError(f"{key}.init_heads needs {key}.init: a checkpoint of this package to take the heads from")


def validate_schedule_owner(config: Config, name: str) -> None:
    try:
        search_head_schedule_owner(config, name)
    except ValueError as error:
        raise ConfigError(f"networks.{name}.search_head_schedule: {error}") from None


def search_head_schedule_owner(config: Config, name: str) -> str:
    """Whose lr and weight decay network `name`'s search head follows: its own, its partner's (a pair) or a
    named network's."""
    setting = config.networks[name].search_head_schedule
    if setting == "own":
        return name
    others = [other for other in config.networks if other != name]
    if setting == "partner":
        if len(others) != 1:
            raise ValueError(f"'partner' needs exactly one other network, the recipe has {others}: name the network "
                             f"whose schedule the search head takes")
        return others[0]
    if setting not in config.networks:
        raise ValueError(f"{setting!r} is neither own, partner nor a network of the recipe ({list(config.networks)})")
    return setting


def validate_term_weights(config: Config) -> None:
    """Loss-term names are the registry's (mokd_scale/method/terms.py, imported only when weights are set)."""
    weights = config.mokd.term_weights
    if not weights:
        return
    from mokd_scale.method.terms import TERMS
    for term, weight in weights.items():
        if term not in TERMS:
            raise ConfigError(f"mokd.term_weights.{term}: no such loss term; the terms are {list(TERMS)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"mokd.term_weights.{term} must be a number >= 0 (0 switches the term off), "
                              f"got {weight!r}")


def validate_world_size(config: Config, world_size: int) -> None:
    train = config.train
    per_step = world_size * train.micro_batch_size
    if train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by world size × "
            f"train.micro_batch_size ({world_size} × {train.micro_batch_size} = {per_step}); "
            f"change one of them with --set")


def gradient_accumulation_steps(config: Config, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: the one place the global batch is split (DeepSpeed's
    gradient_accumulation_steps, the loader's and the synthetic source's batch layout all use it)."""
    validate_world_size(config, world_size)
    return config.train.global_batch_size // (world_size * config.train.micro_batch_size)


def steps_per_epoch(config: Config) -> int:
    """Optimizer steps per "epoch" of data.samples_per_epoch images (schedules and loader re-seeding)."""
    return max(1, config.data.samples_per_epoch // config.train.global_batch_size)


def to_dict(config: Any) -> dict:
    """Plain dict with the YAML spellings (`lambda`), for writing and checkpoints."""
    if dataclasses.is_dataclass(config):
        return {YAML_NAMES.get(f.name, f.name): to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, (dict, Networks)):
        return {k: to_dict(v) for k, v in config.items()}
    return config


def from_dict(raw: dict) -> Config:
    """Inverse of to_dict (used to rebuild a checkpoint's config)."""
    config = build_dataclass(Config, raw, prefix="")
    return config


def write_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    tmp.replace(path)


def with_help(config: Config) -> str:
    """The resolved recipe as YAML, each field followed by its one-line help as a comment."""
    return "\n".join(help_lines(config, indent="")) + "\n"


def help_lines(section: Any, indent: str) -> list[str]:
    lines = []
    for item in dataclasses.fields(section):
        key, value = YAML_NAMES.get(item.name, item.name), getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{indent}{key}:  # {help_of(item)}")
            lines.extend(help_lines(value, indent + "  "))
            continue
        if isinstance(value, Networks):
            lines.append(f"{indent}{key}:  # {help_of(item)}")
            for name, net in value.items():
                lines.append(f"{indent}  {name}:  # network {name}")
                lines.extend(help_lines(net, indent + "    "))
            continue
        text = yaml.safe_dump(to_dict(value), default_flow_style=True, width=1 << 16).strip()
        text = text.removesuffix("\n...").strip()
        lines.append(f"{indent}{key}: {text}  # {help_of(item)}")
    return lines


def sections_help() -> str:
    """The recipe's sections and what each holds, for --help."""
    lines = [f"  {item.name:<12} {help_of(item)}" for item in dataclasses.fields(Config)]
    lines.append(f"  {'networks.X':<12} network X's architecture, optimizer, schedule and engine (the recipes "
                 f"name theirs a, b)")
    return "\n".join(lines)
