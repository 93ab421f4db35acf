"""Dict / JSON / TOML conversion with strict checking: unknown keys and wrong types are errors
naming the key; `a.b=value` overrides; files; `resolve` (preset, then file, then overrides) and
`config_from_json`, the exact inverse of `to_json`. Every path ends in `validate`."""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from t2i.config.checks import validate
from t2i.config.presets import get_preset
from t2i.config.rules import ConfigError, Rule
from t2i.config.sections import Config


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; return it in the field's type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a table/object, got {value!r}")
        return from_dict(annotation, value, prefix=key + ".")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} does not match {annotation}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str) and _non_finite_text(value):  # `inf` is text, `Infinity` a float
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value.strip()}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported field type {annotation}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a (possibly partial) dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}"
        )
    defaults = cls()
    kwargs = {}
    for name in names:
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                # A partial sub-table updates the default (or preset) sub-config.
                kwargs[name] = merge(getattr(defaults, name), value, prefix=prefix + name + ".")
            else:
                kwargs[name] = _coerce(value, hints[name], prefix + name)
    return dataclasses.replace(defaults, **kwargs)


def merge(cfg: Any, data: dict[str, Any], prefix: str = "") -> Any:
    """Return `cfg` with the (nested, partial) values in `data` applied, strictly checked."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    updates = {}
    for name, value in data.items():
        if name not in names:
            raise ConfigError(
                f"unknown config key {prefix + name!r}; valid keys here: {', '.join(sorted(names))}"
            )
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            updates[name] = merge(getattr(cfg, name), value, prefix=prefix + name + ".")
        else:
            updates[name] = _coerce(value, hints[name], prefix + name)
    return dataclasses.replace(cfg, **updates)


def _parse_literal(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, true/false, lists), else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:  # a,b,c -> list, for tuple fields
            return [_parse_literal(part.strip()) for part in text.split(",")]
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def override_key(item: str) -> str:
    """The dotted key (e.g. "vae.z_channels") an `a.b=value` override sets."""
    return item.split("=", 1)[0].strip()


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...],
                    check: bool = True) -> Config:
    """Apply `a.b=value` strings in order, then `validate` the result (unless `check` is
    False: each value is still checked alone, the cross-field checks are the caller's)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        value: Any = _parse_literal(raw)
        hint = _field_type(cfg, parts, item)
        if typing.get_origin(hint) is tuple and not isinstance(value, list):
            value = [value]
        if hint is str and not isinstance(value, str):
            value = raw  # e.g. --set data.subset=512 keeps the string
        nested: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return validate(cfg) if check else cfg


def field_rule(key: str) -> tuple[Any, Rule | None]:
    """(type, rule) of the field at dotted `key`, e.g. "train.grad_accum" -> (int, >= 1): what a
    command-line option that sets this key may accept."""
    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return typing.get_type_hints(cls)[name], f.metadata.get("rule")


def _field_hints(node: Any) -> dict[str, Any]:
    """Field name -> type of a config dataclass (its ClassVars left out); {} for a leaf."""
    if not dataclasses.is_dataclass(node):
        return {}
    hints = typing.get_type_hints(node)
    return {f.name: hints[f.name] for f in dataclasses.fields(node)}


def _field_type(cfg: Any, parts: list[str], override: str) -> Any:
    """The type of the field at `parts`; raises ConfigError quoting the whole `override`."""
    node: Any = type(cfg)
    for i, part in enumerate(parts):
        hints = _field_hints(node)
        if part not in hints:
            known = f"; valid keys here: {', '.join(sorted(hints))}" if hints else ""
            raise ConfigError(f"--set {override!r}: unknown config key "
                              f"{'.'.join(parts[: i + 1])!r}{known}")
        node = hints[part]
    return node


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (data only, never executed)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a folder; give a .json or .toml file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                          f"{err.start})") from None
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} does not parse: {err}") from err
    raise ConfigError(f"config file {str(path)!r}: use a .json or .toml file")


def resolve(preset: str = "tiny", file: str | Path | None = None,
            overrides: list[str] | tuple[str, ...] = (), check: bool = True) -> Config:
    """Preset, then file values, then `--set` overrides. A file may name its own preset.
    `check` False leaves `validate` (the cross-field checks) to the caller: t2i-train runs it
    once a VAE file has brought its architecture (its factor decides the legal resolutions)."""
    data = load_file(file) if file else {}
    cfg = get_preset(data.get("preset", preset) if file else preset)
    if data:
        cfg = merge(cfg, data)
    return apply_overrides(cfg, overrides, check)


def config_from_json(text: str) -> Config:
    """Exact inverse of `to_json` (used for run folders and checkpoint metadata)."""
    return validate(from_dict(Config, json.loads(text)))


def _non_finite_text(text: str) -> bool:
    """`inf`, `-Infinity`, `nan`, ...: text that Python reads as a non-finite float."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False
