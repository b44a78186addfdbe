"""Typed experiment configuration: YAML in, validated dataclasses out.

Every field has a type and a one-line meaning (`schema`). `load_config` refuses unknown keys, wrong types and
impossible values *before any work starts*, raising `ConfigError` with one line that names the key and the
value (`loading`, `typecheck`). Command-line overrides are `a.b=value` strings whose values are parsed as YAML
scalars (so `train.epochs=3`, `cv.seeds=[1,2]`, `train.precision=bf16`). Components take the section they need
(`EnsembleConfig`, `SchedulerConfig`, `TrackingConfig`, ...), so each default lives once, here.
"""

from distrain.config.loading import (
    apply_overrides,
    config_differences,
    config_from_dict,
    dump_yaml,
    flatten,
    load_config,
    parse_override,
    set_path,
    yaml_load,
)
from distrain.config.lookups import check_auto_augment, check_model_names, check_optimizer, timm_optim
from distrain.config.schema import (
    VOLATILE_KEYS,
    AugmentConfig,
    Config,
    CVConfig,
    DataConfig,
    DistillConfig,
    EnsembleConfig,
    MembersConfig,
    ModelConfig,
    OptimConfig,
    PseudoConfig,
    SchedulerConfig,
    SweepConfig,
    TrackingConfig,
    TrainConfig,
    TTAConfig,
    check_members,
    member_columns,
    members_from_dict,
)
from distrain.config.urls import check_no_password, check_tracking_uri
from distrain.errors import ConfigError

__all__ = [
    "VOLATILE_KEYS",
    "AugmentConfig",
    "CVConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EnsembleConfig",
    "MembersConfig",
    "ModelConfig",
    "OptimConfig",
    "DistillConfig",
    "PseudoConfig",
    "SchedulerConfig",
    "SweepConfig",
    "TTAConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_overrides",
    "check_auto_augment",
    "check_members",
    "check_model_names",
    "check_no_password",
    "check_optimizer",
    "check_tracking_uri",
    "config_differences",
    "config_from_dict",
    "dump_yaml",
    "flatten",
    "load_config",
    "member_columns",
    "members_from_dict",
    "parse_override",
    "set_path",
    "timm_optim",
    "yaml_load",
]
