"""The router's configuration: ``router.yaml`` plus environment overrides, validated into a frozen
:class:`RouterConfig`.

- schema.py declares every key once (type, check, default, environment variable, meaning); section.py,
  scalars.py and composites.py hold what those declarations are made of;
- load.py reads the file and the environment and builds the config; rules.py checks what spans keys;
  problems.py words every problem with its location, so that ``check-config`` prints all of them at once;
- specs.py derives the scheduler's view of the models (imported from there: it needs the scheduler).
"""

from vllm_model_router.config.load import build_config, default_state_dir, load_config, yaml_error_problem
from vllm_model_router.config.problems import ConfigError
from vllm_model_router.config.scalars import parse_duration
from vllm_model_router.config.schema import (
    DEFAULT_ENDPOINT,
    ENGINE,
    AuthConfig,
    ConfigFile,
    LimitsConfig,
    ModelConfig,
    RouterConfig,
    json_schema,
)

DEFAULT_STOP_TIMEOUT: float = ModelConfig.model_fields["stop_timeout"].default

__all__ = [
    "DEFAULT_ENDPOINT",
    "DEFAULT_STOP_TIMEOUT",
    "ENGINE",
    "AuthConfig",
    "ConfigError",
    "ConfigFile",
    "LimitsConfig",
    "ModelConfig",
    "RouterConfig",
    "build_config",
    "default_state_dir",
    "json_schema",
    "load_config",
    "parse_duration",
    "yaml_error_problem",
]
