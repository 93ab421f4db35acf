"""Dataset inspection (the "playground"): scan a source in order and report what is in it.

Counts (exact, or an estimate from bytes per sample when the scan stops early), image size,
mode and format histograms, prompt length in words and tokens (share truncated at 77), the most
common words, bad samples by kind and the first BAD_SHOWN of them (shard, key, kind, detail), a
hint when their kinds point at a tar whose sample files are apart, and a PNG contact sheet of
the first good samples. too_small is checked only against a training resolution given (a 32 px
set is not too small in itself), and the report names it.
"""

from __future__ import annotations

import io
import re
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from t2i.data.errors import BadSample, DataError
from t2i.data.latent_shards import require_image_shards
from t2i.data.shards import ShardIssue, image_bytes, member_order_hint, parse_prompt, read_shard
from t2i.data.sources import Shard, resolve_shards, shard_name
from t2i.data.transforms import (SIDEWAYS, check_size, crop_resize, decode, exif_orientation,
                                 open_header)

CONTEXT_LENGTH = 77
TAR_OVERHEAD = 1024  # header blocks and padding per sample file, roughly
BAD_SHOWN = 20  # bad samples listed one by one in the report
THUMB = 128  # contact sheet thumbnail side: the decode size when no resolution is given
STOPWORDS = frozenset(
    "a an the and or of in on at to with for from by is are was be this that it its as "
    "into over under while his her their there".split())


@dataclass
class Inspection:
    source: str
    shards: int
    total_bytes: int | None
    resolution: int | None = None  # the too_small check's training resolution; None: no check
    scanned: int = 0
    scanned_bytes: int = 0
    complete: bool = False
    good: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_samples: list[dict] = field(default_factory=list)  # the first BAD_SHOWN
    shard_errors: list[str] = field(default_factory=list)
    empty_shards: list[str] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    words: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    vocabulary: Counter = field(default_factory=Counter)
    sheet: list[tuple[Image.Image, str]] = field(default_factory=list)

    def estimated_samples(self) -> int | None:
        if self.complete:
            return self.scanned
        if not self.total_bytes or not self.scanned_bytes:
            return None
        return round(self.total_bytes * self.scanned / self.scanned_bytes)

    def as_dict(self) -> dict:
        tokens = np.asarray(self.tokens or [0])
        return {
            "source": self.source, "shards": self.shards, "resolution": self.resolution,
            "scanned": self.scanned,
            "complete": self.complete, "samples": self.scanned if self.complete else None,
            "estimated_samples": self.estimated_samples(), "good": self.good,
            "bad_by_kind": dict(self.bad.most_common()), "bad_samples": self.bad_samples,
            "hints": [h for h in [member_order_hint(self.bad)] if h],
            "shard_errors": self.shard_errors,
            "empty_shards": self.empty_shards,
            "sizes": dict(self.sizes.most_common(10)), "modes": dict(self.modes.most_common()),
            "formats": dict(self.formats.most_common()),
            "prompt_words": summary(self.words), "prompt_tokens": summary(self.tokens),
            "truncated_share": float((tokens > CONTEXT_LENGTH).mean()) if self.tokens else 0.0,
            "top_words": self.vocabulary.most_common(15),
        }


def summary(values: list[int]) -> dict:
    if not values:
        return {}
    v = np.asarray(values)
    return {"mean": round(float(v.mean()), 1), "median": float(np.median(v)),
            "p95": round(float(np.percentile(v, 95)), 1), "max": int(v.max())}


def iterate(shards: list[Shard], limit: int | None, report: Inspection
            ) -> Iterator[tuple[str, dict]]:
    for shard in shards:
        for item in read_shard(shard.url):
            if isinstance(item, ShardIssue):
                if item.kind == "empty_shard":
                    report.empty_shards.append(shard_name(item.url))
                else:
                    report.shard_errors.append(f"{shard_name(item.url)} after sample "
                                               f"{item.offset}: {item.detail}")
                break
            if limit is not None and report.scanned >= limit:
                return
            yield shard.url, item[1]
    report.complete = True


def examine(url: str, example: dict, report: Inspection, sheet_count: int,
            count_tokens: Callable[[str], int] | None) -> None:
    """Count one raw example of shard `url` into `report`: a good one in the histograms (and
    the sheet while it has room), a bad one by kind (and listed while BAD_SHOWN allow). The
    training loader's checks and decode at `report.resolution`; without one no image is
    too_small (check_size at 0: no shorter side is under a quarter of 0), the aspect is
    still checked."""
    try:
        data = image_bytes(example)
        prompt = parse_prompt(example)
        header = open_header(data)
        stored, mode, fmt = header.size, header.mode, header.format
        check_size(stored, report.resolution or 0)
        image, _ = decode(header, report.resolution or THUMB)
        size = stored[::-1] if exif_orientation(header) in SIDEWAYS else stored  # as shown
    except BadSample as bad:
        report.bad[bad.kind] += 1
        if len(report.bad_samples) < BAD_SHOWN:
            report.bad_samples.append({"shard": url, "key": example["__key__"],
                                       "kind": bad.kind, "detail": bad.detail[:200]})
        return
    report.good += 1
    report.sizes[f"{size[0]}x{size[1]}"] += 1
    report.modes[mode] += 1
    report.formats[fmt or "?"] += 1
    words = re.findall(r"[a-z0-9']+", prompt.lower())
    report.words.append(len(prompt.split()))
    report.vocabulary.update(w for w in words if w not in STOPWORDS and len(w) > 1)
    if count_tokens is not None:
        report.tokens.append(count_tokens(prompt))
    if len(report.sheet) < sheet_count:
        report.sheet.append((crop_resize(image, 128), prompt))


def image_shards(source: str, subset: str = "512") -> list[Shard]:
    """The shards of `source`. Raises DataError for a source that names none (resolve_shards)
    or holds no image shard: latent shards, files that are no tar (require_image_shards)."""
    shards = resolve_shards(source, subset)
    require_image_shards(source, shards, "t2i-data inspect")
    return shards


def inspect_source(source: str, subset: str = "512", limit: int | None = None,
                   resolution: int | None = None, sheet_count: int = 16,
                   count_tokens: Callable[[str], int] | None = None,
                   progress: Callable[[Iterator], Iterator] = lambda it: it,
                   shards: list[Shard] | None = None) -> Inspection:
    """Scan `source` in shard order (at most `limit` samples); `shards` if already resolved
    (by image_shards). `resolution`: the training resolution whose too_small check applies
    (a shorter side under a quarter of it); None: sizes are reported, none is too_small.
    Raises DataError as image_shards does."""
    shards = image_shards(source, subset) if shards is None else shards
    sizes = [s.size for s in shards]
    report = Inspection(source, len(shards), sum(sizes) if None not in sizes else None,
                        resolution)
    for url, example in progress(iterate(shards, limit, report)):
        report.scanned += 1
        report.scanned_bytes += sum(len(v) + TAR_OVERHEAD for k, v in example.items()
                                    if isinstance(v, bytes) and not k.startswith("__"))
        examine(url, example, report, sheet_count, count_tokens)
    return report


def contact_sheet(items: list[tuple[Image.Image, str]], columns: int = 4, thumb: int = 128,
                  lines: int = 4) -> Image.Image:
    """Thumbnails in a grid, each with its wrapped (and cut) caption below."""
    font = ImageFont.load_default(11)
    line_height, pad = 13, 4
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + lines * line_height
    rows = max(1, -(-len(items) // columns))
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, prompt) in enumerate(items):
        x, y = (i % columns) * cell_w + pad, (i // columns) * cell_h + pad
        sheet.paste(image.resize((thumb, thumb)), (x, y))
        wrapped = textwrap.wrap(prompt, width=thumb // 6)
        if len(wrapped) > lines:
            wrapped = wrapped[:lines]
            wrapped[-1] = wrapped[-1][: max(0, thumb // 6 - 3)] + "..."
        for j, text in enumerate(wrapped):
            draw.text((x, y + thumb + 2 + j * line_height), text, fill=(0, 0, 0), font=font)
    return sheet


def format_report(info: dict) -> str:
    """Human-readable lines for `t2i-data inspect`."""
    count = (f"{info['samples']} samples" if info["complete"] else
             f"~{info['estimated_samples']} samples (estimate from {info['scanned']} scanned)"
             if info["estimated_samples"] else f">= {info['scanned']} samples (scan stopped)")
    hist = lambda d: ", ".join(f"{k} {v}" for k, v in d.items()) or "-"
    words, tokens = info["prompt_words"], info["prompt_tokens"]
    bad = sum(info["bad_by_kind"].values())
    lines = [
        f"source        {info['source']} ({info['shards']} shard(s))",
        f"samples       {count}; {info['good']} good, {bad} bad",
        f"bad by kind   {hist(info['bad_by_kind'])}",
        f"too_small     {too_small_rule(info['resolution'])}",
        *(f"hint          {hint}" for hint in info["hints"]),
        f"image sizes   {hist(info['sizes'])}",
        f"modes         {hist(info['modes'])}   formats {hist(info['formats'])}",
        f"prompt words  mean {words.get('mean', '-')}  median {words.get('median', '-')}  "
        f"p95 {words.get('p95', '-')}  max {words.get('max', '-')}",
    ]
    if tokens:
        lines.append(f"prompt tokens mean {tokens['mean']}  median {tokens['median']}  "
                     f"p95 {tokens['p95']}  max {tokens['max']}  "
                     f"truncated at {CONTEXT_LENGTH}: {info['truncated_share']:.1%}")
    lines.append("top words     " + ", ".join(f"{w} {n}" for w, n in info["top_words"]))
    lines += [f"shard error   {e}" for e in info["shard_errors"]]
    if info["empty_shards"]:
        lines.append(f"empty shards  {len(info['empty_shards'])}: "
                     + ", ".join(info["empty_shards"][:5])
                     + (", ..." if len(info["empty_shards"]) > 5 else ""))
    return "\n".join(lines + bad_sample_lines(info["bad_samples"], bad))


def too_small_rule(resolution: int | None) -> str:
    """What the report's too_small count means: the resolution it was checked against."""
    if resolution is None:
        return "not checked (pass --resolution R to count images too small to train at R)"
    return (f"shorter side under {max(1, resolution // 4)} px (a quarter of --resolution "
            f"{resolution}, as training at {resolution} skips them)")


def bad_sample_lines(samples: list[dict], total: int) -> list[str]:
    """One line per listed bad sample ("shard key: kind (detail)"), then how many more."""
    lines = [f"bad sample    {s['shard']} {s['key']}: {s['kind']}"
             + (f" ({s['detail']})" if s["detail"] else "") for s in samples]
    if total > len(samples):
        lines.append(f"bad sample    ... {total - len(samples)} more (only the first "
                     f"{len(samples)} are listed)")
    return lines


def check_sheet_path(path: str | Path) -> Path:
    """`path` when PIL writes an RGB image in the format its extension names (any case: .png,
    .JPG, .webp, ...; see PIL.Image.registered_extensions). Raises DataError naming the
    extension otherwise: unknown, read-only, or a format that takes no RGB image."""
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    try:
        Image.new("RGB", (8, 8)).save(io.BytesIO(), fmt)  # fmt None: no such format
    except Exception:  # noqa: BLE001 - plugins refuse a format or mode in many ways
        kind = f"{path.suffix} files" if path.suffix else "a file without an extension"
        raise DataError(f"{str(path)!r}: PIL cannot write a contact sheet as {kind}; "
                        f"use .png or .jpg") from None
    return path


def write_sheet(report: Inspection, path: str | Path) -> Path:
    """Save the contact sheet of `report` at `path` (its folder made if needed). Raises
    DataError for a format check_sheet_path refuses or a file that cannot be written."""
    path = check_sheet_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(report.sheet).save(path)
    except OSError as err:
        raise DataError(f"cannot write contact sheet {str(path)!r}: "
                        f"{err.strerror or err}") from None
    return path
