"""Frozen configuration tree for every part of t2i, presets, and file / override loading.

Every part of the system is configured by a frozen dataclass (`sections.py`). A whole run is one
`Config`. Presets are small factory functions in a registry (`PRESETS`, `presets.py`); no other
module hard-codes model sizes. Configs load from JSON or TOML, take `a.b=value` overrides, reject
unknown keys and wrong types with an error naming the key, and round-trip to JSON exactly
(`loading.py`).

Each field declares its legal values beside it (`ranged`, `one_of`; every float must be finite;
`rules.py`). Which fields of the model sections are architecture (weights fit only under the
same values): `architecture.py`. `validate` checks them and the combinations the models, the schedule and the
optimizer need (`checks.py`); it runs whenever a config is resolved, overridden or read back, so a
bad value fails before any work starts. The UNet, VAE, text tower and noise schedule run the same
checks (`check_unet`, ...) when built from a config directly.

Import every name from `t2i.config`; the modules below are its parts.
"""

from t2i.config.architecture import architecture_changes, listed
from t2i.config.checks import (CLIP_VOCAB_SIZE, check_data, check_text, check_text_training,
                               check_train, check_unet, check_wiring, image_multiple, validate)
from t2i.config.loading import (apply_overrides, config_from_json, field_rule, from_dict,
                                load_file, merge, override_key, resolve, to_dict, to_json)
from t2i.config.presets import PRESETS, base, get_preset, register_preset, small, tiny
from t2i.config.rules import ConfigError, Rule, Section, check_fields, one_of, ranged
from t2i.config.sections import (BETA_SCHEDULES, PRECISIONS, PREDICTION_TYPES, Config, DataConfig,
                                 ScheduleConfig, TextConfig, TrainConfig, UNetConfig, VAEConfig)

__all__ = [
    "BETA_SCHEDULES", "CLIP_VOCAB_SIZE", "architecture_changes", "listed", "PRECISIONS", "PREDICTION_TYPES", "PRESETS", "Config",
    "ConfigError", "DataConfig", "Rule", "ScheduleConfig", "Section", "TextConfig", "TrainConfig",
    "UNetConfig", "VAEConfig", "apply_overrides", "base", "check_data", "check_fields",
    "check_text", "check_text_training", "check_train", "check_unet", "check_wiring", "config_from_json", "field_rule",
    "from_dict", "get_preset", "image_multiple", "load_file", "merge", "one_of", "override_key",
    "ranged",
    "register_preset", "resolve", "small", "tiny", "to_dict", "to_json", "validate",
]
