import pytest
import yaml

from mokd_scale.config import (ConfigError, from_dict, load_config, to_dict, validate_world_size, write_config)


def test_packaged_recipes_load_and_flagship_pairs_vitl_with_r152():
    flagship = load_config("vitl16_r152")
    assert flagship.networks.a.arch == "vit_large_patch16_224" and flagship.networks.b.arch == "resnet152"
    assert flagship.networks.a.lambda_cross == 0.1 and flagship.networks.b.lambda_cross == 1.0
    assert load_config("r50_vits16").mokd.out_dim == 65536
    assert load_config("tiny_cpu").data.source == "synthetic"


def test_overrides_convert_types_and_accept_yaml_spellings():
    config = load_config("tiny_cpu", ["train.steps=7", "networks.a.lr=1e-4", "networks.b.lambda=0.5",
                                      "data.global_crop_scale=[0.3, 1.0]", "networks.a.grad_checkpointing=true",
                                      "networks.b.arch_kwargs={output_stride: 8}"])
    assert config.train.steps == 7 and config.networks.a.lr == pytest.approx(1e-4)
    assert config.networks.b.lambda_cross == 0.5
    assert config.data.global_crop_scale == (0.3, 1.0)
    assert config.networks.a.grad_checkpointing is True
    assert config.networks.b.arch_kwargs == {"output_stride": 8}


@pytest.mark.parametrize("override, words", [
    ("bogus.key=1", ["bogus.key", "valid keys at top level", "train"]),
    ("train.bogus=1", ["train.bogus", "global_batch_size"]),
    ("train.steps=abc", ["train.steps", "integer", "abc"]),
    ("networks.a.lr=fast", ["networks.a.lr", "number", "fast"]),
    ("data.local_crop_size=300", ["local_crop_size", "global_crop_size"]),
    ("train.micro_batch_size=5", ["divisible", "micro_batch_size"]),
    ("networks.b.optimizer=adam", ["networks.b.optimizer", "adamw, sgd, lars", "adam"]),
    ("mokd.mode=joint", ["mokd.mode", "mokd, independent"]),
    ("data.source=folder", ["data.source", "shards, synthetic"]),
    ("train.steps", ["key.path=value"]),
])
def test_bad_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as error:
        load_config("tiny_cpu", [override])
    for word in words:
        assert word in str(error.value)


def test_unknown_recipe_lists_packaged_ones():
    with pytest.raises(ConfigError, match="tiny_cpu"):
        load_config("no_such_recipe")


def test_world_size_must_divide_the_global_batch():
    config = load_config("tiny_cpu", ["train.global_batch_size=64", "train.micro_batch_size=32"])
    validate_world_size(config, 2)
    with pytest.raises(ConfigError, match="world size"):
        validate_world_size(config, 3)


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = load_config("vitl16_r152", ["train.steps=11"])
    write_config(config, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["networks"]["a"]["lambda"] == 0.1
    assert from_dict(raw) == config
    assert load_config(str(tmp_path / "config.yaml")) == config
    assert to_dict(config)["train"]["steps"] == 11


def test_deepspeed_json_resolves_from_the_working_directory_then_the_package(tmp_path, monkeypatch):
    from mokd_scale.config.load import DEEPSPEED_DIR, deepspeed_json_path

    monkeypatch.chdir(tmp_path)  # no ds_configs/ here: the packaged file answers
    assert deepspeed_json_path("ds_configs/zero2_bf16.json") == DEEPSPEED_DIR / "zero2_bf16.json"
    assert deepspeed_json_path("zero2_bf16.json").read_text() == (DEEPSPEED_DIR / "zero2_bf16.json").read_text()
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "zero2_bf16.json").write_text("{}")  # a user's own copy wins
    assert deepspeed_json_path("ds_configs/zero2_bf16.json").resolve() == tmp_path / "ds_configs" / "zero2_bf16.json"
    with pytest.raises(ConfigError, match=r"'my/zero2_bf16.json' not found.*ds_configs/zero3_bf16.json"):
        deepspeed_json_path("my/zero2_bf16.json")  # another folder: never silently the packaged file


def test_print_config_is_the_resolved_recipe_with_a_help_line_per_field():
    from mokd_scale.config import with_help
    config = load_config("r50_vits16", ["train.steps=11", "networks.b.lambda=0.5"])
    text = with_help(config)
    assert yaml.safe_load(text) == to_dict(config)
    leaves = [line for line in text.splitlines() if not line.rstrip().endswith(":") and "  # " in line]
    assert len(leaves) == len(text.splitlines())  # every line, section or field, carries its help
    assert "  lambda: 0.5  # weight of the cross terms" in text and "  steps: 11  # optimizer steps" in text
