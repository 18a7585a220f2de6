"""The config layer: loading YAML configs (with includes and ${VAR}), validating, formatting.

Public API:
- `load_config(path, env=None) -> LoadedConfig` and `load_config_text(text, ...)`
- `validate(loaded) -> list[Diagnostic]` (schema + references; not the loader's diagnostics)
- `format_config(loaded) -> str` and `normalise(data)`
- `list_profiles()`, `PROFILE_DIR`, `SCHEMA_PATH`
"""

from ztun.config.format import format_config, normalise
from ztun.config.loader import (
    PROFILE_DIR,
    LoadedConfig,
    list_profiles,
    load_config,
    load_config_text,
)
from ztun.config.validate import SCHEMA_PATH, format_path, load_schema, validate

__all__ = [
    "PROFILE_DIR",
    "SCHEMA_PATH",
    "LoadedConfig",
    "format_config",
    "format_path",
    "list_profiles",
    "load_config",
    "load_config_text",
    "load_schema",
    "normalise",
    "validate",
]
