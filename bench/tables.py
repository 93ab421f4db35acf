"""The bench's printed tables: one fixed-width table per case, times in milliseconds."""

from __future__ import annotations

from typing import Any

_FIXED = ("case", "name", "median_s", "p10_s", "p90_s", "repeats")
_HIDDEN = {"mean_s", "min_s"}


def is_seconds(key: str) -> bool:
    """A column in seconds ("median_s", "unet_calls_s"), printed in ms; rates such as
    "samples_per_s" or "images_per_s" end in "_s" too but are not times."""
    return key.endswith("_s") and "_per_" not in key


def _header(key: str) -> str:
    return key[:-2] + "_ms" if is_seconds(key) else key


def _cell(key: str, value: Any) -> str:
    if isinstance(value, float):
        if is_seconds(key):
            return f"{value * 1e3:.4g}"
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """Readable fixed-width table; times in milliseconds, extras as extra columns."""
    extras: list[str] = []
    for row in rows:
        extras += [k for k in row if k not in _FIXED and k not in _HIDDEN and k not in extras
                   and not k.endswith("_vs")]
    keys = list(_FIXED) + extras
    header = [_header(k) for k in keys]
    body = [[_cell(k, row[k]) if k in row else "" for k in keys] for row in rows]
    for row, cells in zip(rows, body):  # "12.3x vs eager": the ratio says what it compares to
        for i, k in enumerate(keys):
            if k in row and k + "_vs" in row:
                cells[i] = f"{row[k]:.3g}x vs {row[k + '_vs']}"
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def format_tables(rows: list[dict]) -> str:
    """One `format_table` per case (in first-seen order), so each shows only its own columns."""
    cases = list(dict.fromkeys(row.get("case", "") for row in rows))
    return "\n\n".join(format_table([row for row in rows if row.get("case", "") == case])
                        for case in cases)
