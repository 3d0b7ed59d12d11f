"""Typed configs: dataclass schemas, YAML + key=value overrides, validation with field-naming errors."""
from .loader import ConfigError, apply_override, build_dataclass, field_help, load_config, read_yaml, to_dict
from .schema import DataConfig, LoraSettings, ModelConfig, OfflineConfig, OptimConfig, RunConfig
from .schema import _f as schema_field

__all__ = ["ConfigError", "apply_override", "build_dataclass", "field_help", "load_config", "read_yaml",
           "to_dict", "schema_field", "DataConfig", "LoraSettings", "ModelConfig", "OfflineConfig", "OptimConfig", "RunConfig"]
