"""From a YAML file (or a dict) and `key=value` overrides to a checked `ExperimentConfig`.

Every value is checked against its dataclass annotation as it is read: an unknown key,
a value of the wrong type or one outside its `Literal` stops the run with a message
that names the key, the value seen and what is allowed. Overrides (dotted keys, YAML
values) apply on top of the file, from the command line or from Flower's
`--run-config`. The cross-field checks run last (checks.py).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from common.config.checks import check_experiment
from common.config.schema import RENAMED_KEYS, ConfigError, ExperimentConfig, workload_sections
from common.workloads import WORKLOADS

# common/config/loading.py -> the repository root.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a mapping")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if tp is type(None):
        if value is not None:
            raise bad
        return None
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp!r} for '{key}'")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            renamed = f" ('{path}' is now {RENAMED_KEYS[path]})" if path in RENAMED_KEYS else ""
            raise ConfigError(
                f"unknown config key '{path}'{renamed}. Allowed keys here: {', '.join(names)}"
            )
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def _build_experiment(raw: dict[str, Any]) -> ExperimentConfig:
    sections = workload_sections()
    names = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "sections"]
    for key in raw:
        if key not in names and key not in sections:
            raise ConfigError(f"unknown config key '{key}'. Allowed keys here: "
                              f"{', '.join(names + list(sections))}")
    if "workload" in raw and raw["workload"] not in WORKLOADS:
        raise ConfigError(f"config key 'workload': got {raw['workload']!r}, expected one of "
                          f"{', '.join(repr(w) for w in WORKLOADS)}")
    cfg = _build(ExperimentConfig, {k: v for k, v in raw.items() if k not in sections})
    cfg.sections = {key: _coerce(raw.get(key, {}), cls, key) for key, cls in sections.items()}
    return cfg


def parse_overrides(items: list[str] | str) -> dict[str, Any]:
    """Parse `a.b=value` items (a list, or one space-separated string) into a dict."""
    if isinstance(items, str):
        items = items.split()
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. rounds=5)"
            )
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})")
    return out


def _apply(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
    node[parts[-1]] = value


def resolve_path(path: str | Path) -> Path:
    """A config path as given, else relative to the project root (for `flwr run`)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return PROJECT_ROOT / p


def config_from_dict(raw: dict[str, Any], overrides: dict[str, Any] | None = None
                     ) -> ExperimentConfig:
    raw = json.loads(json.dumps(raw))  # deep copy; also rejects non-JSON values early
    for key, value in (overrides or {}).items():
        _apply(raw, key, value)
    cfg = _build_experiment(raw)
    check_experiment(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | str | dict | None = None
                ) -> ExperimentConfig:
    """Load a YAML experiment file, apply overrides, validate everything."""
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found. Pass a YAML file from configs/, "
            "e.g. --config configs/quickstart.yaml"
        )
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}")
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top")
    if overrides is not None and not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    return config_from_dict(raw, overrides)
