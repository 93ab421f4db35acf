"""The output folder of `t2i-data encode` (see t2i.data.encode): the plan every rank shares,
the settings check that refuses an OUT made with another VAE or other settings, the per-shard
records that make a rerun resume, and the manifest written once every shard is finished.

    OUT/NAME.tar                  one finished output shard per usable input shard
    OUT/.NAME.tmp                 an output shard being written (renamed when complete)
    OUT/.encode/manifest.json     the settings of an unfinished encode (from its first start)
    OUT/.encode/NAME.json         the record of a finished shard: {"samples", "bytes", "bad",
                                  and "missing", "converted", "shard_error" when non-empty}
    OUT/manifest.json             written by `finish_output` (t2i.data.latent_shards), which
                                  then removes OUT/.encode

A shard whose tar and record both exist is finished and never encoded again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from t2i.data.errors import DataError
from t2i.data.latent_shards import LatentManifest, is_record, manifest_path, read_manifest
from t2i.data.sources import shard_name

STATE = ".encode"  # OUT/.encode: settings of the unfinished encode and one record per shard


@dataclass(frozen=True)
class EncodePlan:
    """What one encode does: `urls` (usable input shards, in order) into `out`, with the
    settings of `manifest` (its `shards` still empty). The same on every rank."""

    out: Path
    urls: tuple[str, ...]
    sizes: tuple[int | None, ...]  # bytes of each input shard where known (progress estimate)
    manifest: LatentManifest
    batch_size: int


SETTING_NAMES = {"vae_sha256": "--vae", "resolutions": "--resolution", "dtype": "--dtype",
                 "crop": "--crop", "precision": "--precision", "source": "SRC",
                 "source_shards_digest": "SRC's shard list", "latent_scale": "--vae",
                 "z_channels": "--vae", "downsample_factor": "--vae"}


def check_settings(found: LatentManifest, wanted: LatentManifest, where: Path) -> None:
    """Raises DataError naming the first setting of `wanted` that differs from `found`."""
    old, new = found.settings(), wanted.settings()
    for key in new:
        if old.get(key) == new[key]:
            continue
        if key == "vae_sha256":
            raise DataError(f"{str(where)!r} holds latents of another VAE (sha256 "
                            f"{old[key][:12]}..., this --vae {new[key][:12]}...): encode into "
                            f"another OUT")
        raise DataError(f"{str(where)!r} was encoded with {key}={old.get(key)!r}, now "
                        f"{new[key]!r} ({SETTING_NAMES.get(key, key)}): rerun with the same "
                        f"settings to resume, or encode into another OUT")


def earlier_manifests(out: Path) -> list[LatentManifest]:
    """The finished manifest and the unfinished encode's settings found in `out`."""
    return [read_manifest(folder) for folder in (out, out / STATE)
            if manifest_path(folder).is_file()]


def prepare_output(plan: EncodePlan) -> None:
    """Rank 0, before encoding: refuse an OUT made with other settings, or one that holds files
    no encode wrote; then record the settings in OUT/.encode/manifest.json. Raises DataError."""
    out = plan.out
    earlier = earlier_manifests(out) if out.is_dir() else []
    for found in earlier:
        check_settings(found, plan.manifest, out)
    if not earlier and out.is_dir():
        names = {shard_name(u) for u in plan.urls}
        others = sorted(p.name for p in out.iterdir()
                        if p.name not in names | {STATE} and not p.name.endswith(".tmp"))
        if others:
            raise DataError(f"OUT {str(out)!r} holds files no encode wrote (e.g. {others[0]}): "
                            f"choose a new or empty folder")
    write_text(manifest_path(out / STATE), plan.manifest.to_json())


def shard_record(plan: EncodePlan, name: str) -> dict | None:
    """The record of a finished output shard (its tar and its record exist), else None.
    Raises DataError naming a record file that is damaged."""
    if not (plan.out / name).is_file():
        return None
    path = plan.out / STATE / f"{name}.json"
    if path.is_file():
        return read_record(path)
    finished = manifest_path(plan.out)
    if finished.is_file():
        return read_manifest(plan.out).shards.get(name)
    return None


def read_record(path: Path) -> dict:
    """A shard record written by ShardOut.finish. Raises DataError naming the file when it
    cannot be read, is not UTF-8 JSON, or lacks "samples" or "bad"."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        problem = err.strerror if isinstance(err, OSError) else f"not JSON: {err}"
        raise DataError(f"shard record {str(path)!r} is damaged ({problem}): delete it, and "
                        f"the same command encodes that shard anew") from None
    if not is_record(record):
        raise DataError(f"shard record {str(path)!r} is damaged (no samples and bad counts): "
                        f"delete it, and the same command encodes that shard anew")
    return record


def finish_output(plan: EncodePlan) -> LatentManifest:
    """Rank 0, after every rank finished: OUT/manifest.json from the shard records (temporary
    name, then rename); OUT/.encode removed. Raises DataError when a shard is unfinished."""
    records = {shard_name(u): shard_record(plan, shard_name(u)) for u in plan.urls}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {str(plan.out)!r} are not encoded "
                        f"({missing[0]}, ...): run the same command again to finish them")
    bad: Counter = Counter()
    for record in records.values():
        bad.update(record["bad"])
    manifest = replace(plan.manifest, shards=records, bad_by_kind=dict(sorted(bad.items())))
    write_text(manifest_path(plan.out), manifest.to_json())
    shutil.rmtree(plan.out / STATE, ignore_errors=True)
    return manifest


def write_text(path: Path, text: str) -> None:
    """Write via a hidden temporary sibling and rename. Raises DataError (disk full, ...)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # (a file in place of a folder: ENOTDIR)
            tmp.unlink()
        raise DataError(f"cannot write {str(path)!r}: {err.strerror or err}") from None


def summary(manifest: LatentManifest, written_bytes: int, new_samples: int) -> str:
    """The final line: samples, bytes per sample, GB written by this run, bad samples."""
    total = sum(int(s.get("bytes", 0)) for s in manifest.shards.values())
    per = total / manifest.samples if manifest.samples else 0.0
    bad = ", ".join(f"{k} {n}" for k, n in sorted(manifest.bad_by_kind.items())) or "none"
    return (f"{manifest.samples} samples in {len(manifest.shards)} shard(s) "
            f"({new_samples} encoded now), {per:,.0f} bytes per sample "
            f"({'/'.join(map(str, manifest.resolutions))} px, {manifest.dtype}), "
            f"{written_bytes / 1e9:.3f} GB written; bad samples skipped: {bad}")
