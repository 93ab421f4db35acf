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

A shard whose tar matches its record (its size, and a tar's end-of-archive blocks at its end) is
finished and never encoded again; one that does not (cut, overwritten, deleted) is encoded again.
Encode replaces or deletes only what an encode wrote: see `foreign_file`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from t2i.config import DataConfig, listed
from t2i.data.errors import DataError
from t2i.data.latent_shards import (MANIFEST, LatentManifest, is_record, manifest_path,
                                    read_manifest, shard_contents)
from t2i.data.loader import DataStats
from t2i.data.sources import shard_name

STATE = ".encode"  # OUT/.encode: settings of the unfinished encode and one record per shard
STOP = "stop"  # OUT/.encode/stop: under torchrun, the error that stopped a rank, for the others
TRAINING = DataConfig()  # the bad-sample limits a training run applies unless told otherwise


@dataclass(frozen=True)
class EncodePlan:
    """What one encode does: `urls` (usable input shards, in order) into `out`, with the
    settings of `manifest` (its `shards` still empty). The same on every rank."""

    out: Path
    urls: tuple[str, ...]
    sizes: tuple[int | None, ...]  # bytes of each input shard where known (progress estimate)
    manifest: LatentManifest
    batch_size: int
    max_bad_fraction: float = TRAINING.max_bad_fraction  # refuse what training would refuse
    bad_check_after: int = TRAINING.bad_check_after


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
    no encode wrote where this encode would write (`foreign_file`); then record the settings in
    OUT/.encode/manifest.json. Raises DataError."""
    out = plan.out
    earlier = earlier_manifests(out) if out.is_dir() else []
    for found in earlier:
        check_settings(found, plan.manifest, out)
    foreign = foreign_file(plan, bool(earlier)) if out.is_dir() else None
    if foreign:
        fix = "move them out of OUT and rerun, or " if earlier else ""
        raise DataError(f"OUT {str(out)!r} holds files no encode wrote (e.g. {foreign}): {fix}"
                        f"choose a new or empty folder")
    (out / STATE / STOP).unlink(missing_ok=True)  # an earlier run's: this one starts afresh
    write_text(manifest_path(out / STATE), plan.manifest.to_json())


class PeerStopped(Exception):
    """Another rank failed (its error is in OUT/.encode/stop): this rank stops too."""


def request_stop(plan: EncodePlan, message: str) -> None:
    """A rank that failed tells the others (they look after each chunk: `stop_requested`), so
    they stop within a chunk instead of encoding for hours into a collective that would time
    out. The first error is kept."""
    path = plan.out / STATE / STOP
    if path.parent.is_dir() and not path.exists():
        write_text(path, message)


def stop_requested(plan: EncodePlan) -> str | None:
    """The error a failed rank left (request_stop), else None."""
    try:
        return (plan.out / STATE / STOP).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def foreign_file(plan: EncodePlan, known: bool) -> str | None:
    """The first file of OUT that this encode could replace or delete though no encode wrote
    it ("NAME" or "NAME: why"), else None. `known`: OUT holds a manifest of these settings.
    Without one, all is foreign but OUT/.encode and temporary files in it: an encode records its
    settings before it writes anything. With one, see `foreign_shard`."""
    if known:
        return next(filter(None, (foreign_shard(plan, shard_name(u)) for u in plan.urls)), None)
    state = plan.out / STATE
    names = [p.name for p in plan.out.iterdir() if p.name != STATE]
    if state.is_dir():  # (a killed first write of its manifest leaves a hidden .tmp)
        names += [f"{STATE}/{p.name}" for p in state.iterdir() if not p.name.endswith(".tmp")]
    return min(names, default=None)


def foreign_shard(plan: EncodePlan, name: str) -> str | None:
    """"NAME: why" when OUT/NAME exists, is not finished (see `damage`) and may not be encoded
    again, else None. Encoded again: a recorded shard (finished, then damaged) unless it now
    holds samples without moments (an image shard put in its place); an unrecorded latent shard
    or empty tar (renamed into place by a run killed before it wrote the record). Reads one
    sample of an unfinished OUT/NAME."""
    path = plan.out / name
    if not (path.exists() or path.is_symlink()):
        return None
    record = recorded(plan, name)
    if record is not None and damage(path, record) is None:
        return None
    held = shard_contents(path) if path.is_file() else "no file"
    if held in ("latent", "none") or (held == "damaged" and record is not None):
        return None
    what = {"other": "it holds samples without moments files", "no file": "it is not a file",
            "damaged": "it is no readable tar, and no finished shard"}[held]
    return f"{name}: {what}"


def recorded(plan: EncodePlan, name: str) -> dict | None:
    """The record of output shard `name` (OUT/.encode/NAME.json, else the entry of the finished
    manifest), whether or not OUT/NAME still matches it. Raises DataError naming a record file
    that is damaged."""
    path = plan.out / STATE / f"{name}.json"
    if path.is_file():
        return read_record(path)
    finished = manifest_path(plan.out)
    if finished.is_file():
        return read_manifest(plan.out).shards.get(name)
    return None


def damage(path: Path, record: dict) -> str | None:
    """Why the output shard at `path` does not match its record (for the log), else None: it
    must have the recorded size, end with a tar's two all-zero end-of-archive blocks and hold
    latent samples (an image shard of the same padded size copied over it does not). Reads its
    last 1 KiB and its first sample only (hashing every shard on each rerun would read the whole
    output), so a change in place at the same size goes unnoticed here; training counts the
    samples it damaged (corrupt_latent)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - 1024, 0))
            tail = f.read(1024)
    except FileNotFoundError:
        return "the file is missing"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    if size != record.get("bytes", size):
        return f"it is {size:,} bytes, its record says {record['bytes']:,}"
    if len(tail) < 1024 or tail.count(0) < 1024:
        return "it does not end with a tar's end-of-archive blocks"
    if record.get("samples") and shard_contents(path) != "latent":
        return "it holds samples without moments (not a latent shard)"
    return None


def shard_record(plan: EncodePlan, name: str) -> dict | None:
    """The record of a finished output shard (its tar matches it: see `damage`), else None.
    Raises DataError naming a record file that is damaged."""
    record = recorded(plan, name)
    return record if record is not None and damage(plan.out / name, record) is None else None


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
    name, then rename); OUT/.encode removed. Raises DataError when a shard is unfinished, or
    when all shards together hold too many bad samples (`check_bad_share`)."""
    records = {shard_name(u): shard_record(plan, shard_name(u)) for u in plan.urls}
    missing = [name for name, record in records.items() if record is None]
    if missing:
        raise DataError(f"{len(missing)} shard(s) of {str(plan.out)!r} are not encoded "
                        f"({missing[0]}, ...): run the same command again to finish them")
    tally = BadTally()
    for record in records.values():
        tally.add(record)
    check_bad_share(tally, plan)
    manifest = replace(plan.manifest, shards=records, bad_by_kind=dict(sorted(tally.bad.items())))
    write_text(manifest_path(plan.out), manifest.to_json())
    remove_state(plan)
    return manifest


def remove_state(plan: EncodePlan) -> None:
    """Delete what an encode writes in OUT/.encode (its manifest, the plan's shard records and
    their temporary names), then the folder unless something else is left in it."""
    names = [MANIFEST, STOP, *(f"{shard_name(u)}.json" for u in plan.urls)]
    state = plan.out / STATE
    for name in names:
        (state / name).unlink(missing_ok=True)
        (state / f".{name}.tmp").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        state.rmdir()


@dataclass
class BadTally:
    """Samples read, and the bad ones as a training run at resolution R counts them: the
    samples usable at no resolution (`bad`) plus those without moments at R (`missing`)."""

    read: int = 0
    bad: Counter = field(default_factory=Counter)  # kind -> samples
    missing: dict[str, Counter] = field(default_factory=dict)  # "R" -> kind -> samples

    def add(self, record: dict) -> None:
        """Count a shard record (or the same counts of part of a shard), in place."""
        self.read += record["samples"] + sum(record["bad"].values())
        self.bad.update(record["bad"])
        for r, kinds in record.get("missing", {}).items():
            self.missing.setdefault(str(r), Counter()).update(kinds)


def check_bad_share(tally: BadTally, plan: EncodePlan) -> None:
    """Raises DataError when, at some resolution, the bad share of the samples read passes
    plan.max_bad_fraction once plan.bad_check_after samples were read: the training loader's
    check (DataStats.check), which a training run on the same images would stop at."""
    limits = replace(TRAINING, source=plan.manifest.source,
                     max_bad_fraction=plan.max_bad_fraction,
                     bad_check_after=plan.bad_check_after)
    for r in plan.manifest.resolutions:
        bad = tally.bad + tally.missing.get(str(r), Counter())
        stats = DataStats({"good": tally.read - sum(bad.values()), "bad_by_kind": bad})
        try:
            stats.check(limits)
        except DataError as err:
            raise DataError(f"{err}; a training run at {r} px stops there too (each bad "
                            f"sample is logged above with its shard and key; --max-bad-fraction "
                            f"allows more)") from None


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
    """The final line: samples, bytes per sample, GB written by this run, bad samples, and the
    source shards that stopped early (shard_error in their records)."""
    total = sum(int(s.get("bytes", 0)) for s in manifest.shards.values())
    per = total / manifest.samples if manifest.samples else 0.0
    bad = ", ".join(f"{k} {n}" for k, n in sorted(manifest.bad_by_kind.items())) or "none"
    cut = sorted(name for name, s in manifest.shards.items() if s.get("shard_error"))
    return (f"{manifest.samples} samples in {len(manifest.shards)} shard(s) "
            f"({new_samples} encoded now), {per:,.0f} bytes per sample "
            f"({'/'.join(map(str, manifest.resolutions))} px, {manifest.dtype}), "
            f"{written_bytes / 1e9:.3f} GB written; bad samples skipped: {bad}"
            + (f"; {len(cut)} source shard(s) stopped early ({listed(cut)}: their samples "
               f"after the cut are missing; "
               f"for a remote source run the same command again to read them again)"
               if cut else ""))
