"""Job configuration: pydantic models loaded from YAML in ``jobs/`` plus ``key=value`` overrides.

Every model forbids unknown keys, so a typo is an error that names the key, never a silently ignored setting.
Values are validated, never rewritten.
"""

from rayuid.config.job import ConfigError, TrainConfig, dump_config, field_docs, load_config, parse_overrides
from rayuid.config.method import (
    CheckpointSettings,
    DataSettings,
    DataSource,
    ExtractConfig,
    LoraSettings,
    LossSettings,
    ModelSettings,
    OptimSettings,
    TeacherSettings,
    TemplateSettings,
)
from rayuid.config.online import (
    USER_ID_PATTERN,
    JudgeSettings,
    OnlineSettings,
    SamplingSettings,
    UserSettings,
    UserSpec,
)
from rayuid.config.system import EngineSettings, RaySettings, Resources

__all__ = [
    "USER_ID_PATTERN", "CheckpointSettings", "ConfigError", "DataSettings", "DataSource", "EngineSettings", "ExtractConfig",
    "JudgeSettings", "LoraSettings", "LossSettings", "ModelSettings", "OnlineSettings", "OptimSettings",
    "RaySettings", "Resources", "SamplingSettings", "TeacherSettings", "TemplateSettings", "TrainConfig",
    "UserSettings", "UserSpec", "dump_config", "field_docs", "load_config", "parse_overrides",
]
