"""Experiment configuration: YAML files in `configs/` loaded into typed dataclasses.

Every key is checked at start: an unknown key, a value of the wrong type or a value
outside its allowed set stops the run with a message that names the key, the value
seen and what is allowed. `key=value` overrides (dotted keys, YAML values) apply on
top of the file, from the command line or from Flower's `--run-config`. Nothing here
imports torch or Flower, so a bad config fails before either loads.

    schema.py    the sections as dataclasses, TASKS, the strategy names by family
    loading.py   YAML and overrides -> typed dataclasses (load_config, config_from_dict)
    checks.py    ranges and cross-field checks (need), which strategies DP and SecAgg+ take

A workload's own section (`model` for mtsc, `distill` for tosc) is a dataclass in its
`models/<workload>/config.py`, found through the registry (common/workloads.py) and
checked by that module's `check`; `cfg.<section>` reads it like any other.
"""

from common.config.checks import (
    CENTRAL_DP_REFUSED,
    MEAN_STRATEGIES,
    MODULE_PATTERN,
    NAME_PATTERN,
    check_experiment,
    need,
)
from common.config.loading import (
    PROJECT_ROOT,
    config_from_dict,
    load_config,
    parse_overrides,
    resolve_path,
)
from common.config.schema import (
    CHANNEL_MODELS,
    LORA_STRATEGIES,
    STRATEGY_NAMES,
    TASKS,
    TRACKERS,
    WEIGHT_STRATEGIES,
    ChannelConfig,
    ConfigError,
    DataConfig,
    DPConfig,
    ExperimentConfig,
    LabelLeakageConfig,
    LoraConfig,
    PrivacyConfig,
    SimulationConfig,
    SplitConfig,
    SplitDefenceConfig,
    StrategyConfig,
    StrategyName,
    TrainConfig,
    workload_sections,
)

__all__ = [
    "CENTRAL_DP_REFUSED", "CHANNEL_MODELS", "LORA_STRATEGIES", "MEAN_STRATEGIES", "MODULE_PATTERN",
    "NAME_PATTERN", "PROJECT_ROOT", "STRATEGY_NAMES", "TASKS", "TRACKERS",
    "WEIGHT_STRATEGIES",
    "ChannelConfig", "ConfigError", "DataConfig", "DPConfig", "ExperimentConfig",
    "LabelLeakageConfig", "LoraConfig", "PrivacyConfig", "SimulationConfig", "SplitConfig",
    "SplitDefenceConfig", "StrategyConfig", "StrategyName", "TrainConfig",
    "check_experiment", "config_from_dict", "load_config", "need", "parse_overrides",
    "resolve_path", "workload_sections",
]
