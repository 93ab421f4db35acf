"""Legal values of single config fields: each field declares its rule beside it (`ranged`,
`one_of`; every float must also be finite), and a `Section` checks its fields when it is built,
so no config object holds an illegal single value. Combinations of fields: `checks.py`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A configuration value, key, file or preset is invalid; the message names it."""


@dataclass(frozen=True)
class Rule:
    """The legal values of one field (of each item, for a tuple field): an interval, whose ends
    are excluded when `low_open` / `high_open`, or a set of `choices`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.low == self.high:
            return str(self.low)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def ranged(default: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A field whose values (tuple items) must lie in [low, high] (ends excluded when open)."""
    return field(default=default, metadata={"rule": Rule(low, high, low_open, high_open)})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A string field that must be one of `choices`."""
    return field(default=default, metadata={"rule": Rule(choices=choices)})


def check_fields(section: Any, prefix: str) -> None:
    """Each field of one config dataclass against its rule (each item of a tuple, which must not
    be empty); every float must be finite."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        rule = f.metadata.get("rule")
        if value == ():
            raise ConfigError(f"{prefix}{f.name} must not be empty")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}{f.name} must be a finite number, got {item}")
            if rule is not None and not rule.allows(item):
                raise ConfigError(f"{prefix}{f.name} must be {rule.describe()}, got {item!r}")


class Section:
    """A part of the config: every field is checked against its rule when the part is built, so
    no config object holds an illegal single value (combinations: see `validate`)."""

    key: ClassVar[str] = ""  # its key in Config

    def __post_init__(self) -> None:
        check_fields(self, f"{self.key}.")
