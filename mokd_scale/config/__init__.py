"""The recipe: its fields (schema.py) and YAML + `--set` overrides turned into a checked, frozen Config
(load.py). Import from here: `from mokd_scale.config import Config, load_config`."""
from mokd_scale.config.load import (CONFIG_DIR, ConfigError, add_set_argument, apply_override, deepspeed_json_path,
                                    from_dict, gradient_accumulation_steps, load_config, recipe_path,
                                    search_head_schedule_owner, sections_help, steps_per_epoch, to_dict, validate,
                                    validate_world_size, with_help, write_config)
from mokd_scale.config.schema import (IMAGENET_MEAN, IMAGENET_STD, Config, DataConfig, EvalConfig, MokdConfig,
                                      NetworkConfig, Networks, TrainConfig)

__all__ = ["CONFIG_DIR", "Config", "ConfigError", "DataConfig", "EvalConfig", "IMAGENET_MEAN", "IMAGENET_STD",
           "MokdConfig", "NetworkConfig", "Networks", "TrainConfig", "add_set_argument", "apply_override",
           "deepspeed_json_path", "from_dict", "gradient_accumulation_steps", "load_config", "recipe_path",
           "search_head_schedule_owner", "sections_help", "steps_per_epoch", "to_dict", "validate",
           "validate_world_size", "with_help", "write_config"]
