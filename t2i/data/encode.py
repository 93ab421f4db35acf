"""`t2i-data encode`: image shards -> latent shards (the format of t2i.data.latent_shards), once.

    plan = plan_encode(src, out, settings, vae_facts)      # every rank: the same plan
    prepare_output(plan)                                   # rank 0, before any rank encodes
    report = encode_shards(plan, vae, rank=r, world_size=n, ...)   # each rank its own shards
    manifest = finish_output(plan)                         # rank 0, after every rank finished

Pixels are made exactly as the training loader makes them at each resolution R (the same
`image_bytes`, `parse_prompt`, `open_header` / `check_size` / `decode` / `crop_resize` calls
with a centre crop and no flip), and bad samples are skipped under the loader's kinds; a source
whose bad share passes data.max_bad_fraction (after data.bad_check_after samples, at any of the
resolutions) is refused as a training run on its images would refuse it. A random crop or flip
cannot be frozen into a file, so only `crop="center"` exists here.

Several resolutions share one read of each sample and one JPEG decode wherever the training
loader would decode at the same DCT scale (PIL `draft`); a 512 px JPEG at 256 and 512 is decoded
twice (at 1/2 and full scale), because a 256 px run decodes it at 1/2 scale and its frozen
pixels must be those. A sample usable at some resolutions only (`too_small` at 512, fine at 256)
is written with the moments it has; the shard's record counts it under "missing" {R: {kind: n}}.
A sample usable at none is skipped and counted under "bad" {kind: n} (the kind met at the
smallest resolution).

Encoder batches are runs of `batch_size` usable samples of one shard in shard order, so the
output bytes depend on the input, the VAE, the settings and `batch_size` only: not on the number
of workers or ranks, nor on where an earlier run stopped.

The output folder (temporary names, per-shard records, resume, the settings check and the
manifest) is t2i.data.encode_folder; empty input shards are dropped as the training loader
drops them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i.data.errors import BadSample, DataError
from t2i.data.encode_folder import (STATE, TRAINING, BadTally, EncodePlan, PeerStopped,
                                    check_bad_share, damage, finish_output, prepare_output,
                                    recorded, request_stop, stop_requested, summary, write_text)
from t2i.data.latent_shards import (LatentManifest, holds_latents, moments_bytes,
                                    moments_extension, require_image_shards)
from t2i.data.shards import ShardIssue, image_bytes, parse_prompt, read_shard
from t2i.data.sources import (absolute_source, is_empty_shard, is_remote, resolve_shards,
                              shard_name)
from t2i.data.transforms import check_size, crop_resize, decode, open_header, to_float
from t2i.data.workers import ignore_stop_signals

log = logging.getLogger("t2i.data")
Progress = Callable[[int, "int | None"], None]  # (samples read since last call, estimated total)


def plan_encode(src: str, out: str | Path, *, subset: str, resolutions: Iterable[int], dtype: str,
                crop: str, batch_size: int, precision: str, vae_sha256: str,
                latent_scale: float, z_channels: int, factor: int, t2i_version: str = "",
                max_bad_fraction: float = TRAINING.max_bad_fraction,
                bad_check_after: int = TRAINING.bad_check_after) -> EncodePlan:
    """Resolve SRC and check the settings. `precision` is the encoder's resolved autocast dtype
    ("fp32", "bf16", "fp16"); `max_bad_fraction` and `bad_check_after` are training's data.*
    limits (see encode_folder.check_bad_share). Raises DataError: a bad source, a resolution
    that is not a multiple of the VAE factor, latent shards or files that are no tar as SRC, two
    input shards with one file name, OUT inside SRC's shards."""
    resolutions = tuple(sorted(set(resolutions)))
    if not resolutions:
        raise DataError("give at least one --resolution")
    for r in resolutions:
        if r % factor:
            raise DataError(f"--resolution {r} is not a multiple of the VAE's downsampling "
                            f"factor {factor}")
    if crop != "center":
        raise DataError(f"--crop {crop}: only center crops can be encoded ahead of training")
    if holds_latents(src):
        raise DataError(f"{src!r} holds latent shards already: encode image shards")
    found = resolve_shards(src, subset)
    require_image_shards(src, found, "t2i-data encode")
    urls = tuple(s.url for s in found if not is_empty_shard(s))  # as the training loader does
    if len(urls) < len(found):
        log.warning("%s: skipping %d empty shard(s)", src, len(found) - len(urls))
    if not urls:
        raise DataError(f"data source {src!r} has no usable sample: all {len(found)} shard(s) "
                        f"are empty")
    names = [shard_name(u) for u in urls]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"{src!r} has several shards named {twice[0]}: one output shard per "
                        f"input shard needs distinct names; encode each folder into its own OUT")
    out = Path(out)
    for url in urls:
        if "://" not in url and Path(url).resolve().parent == out.resolve():
            raise DataError(f"OUT {str(out)!r} holds the input shards: choose another folder")
    sizes = {s.url: s.size for s in found}
    listing = "\n".join(f"{shard_name(s.url)} {s.size}" for s in found)
    manifest = LatentManifest(
        vae_sha256=vae_sha256, latent_scale=float(latent_scale), z_channels=z_channels,
        downsample_factor=factor, resolutions=resolutions, dtype=dtype, crop=crop,
        source=absolute_source(src), source_shards_digest=sha256_text(listing),
        precision=precision, t2i_version=t2i_version)
    return EncodePlan(out, urls, tuple(sizes.get(u) for u in urls), manifest, batch_size,
                      max_bad_fraction, bad_check_after)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Reading and decoding (in DataLoader workers or in process)
# ----------------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Up to `batch_size` usable samples of one shard, decoded, and what was met on the way."""

    shard: str  # the input shard's file name (= the output shard's)
    keys: list[str] = field(default_factory=list)
    metas: list[bytes] = field(default_factory=list)  # each sample's output KEY.json
    images: dict[int, list[np.ndarray]] = field(default_factory=dict)  # R -> (R, R, 3) uint8
    has: list[tuple[int, ...]] = field(default_factory=list)  # the resolutions of each sample
    bad: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, key, detail)
    missing: list[tuple[int, str, str]] = field(default_factory=list)  # (R, kind, key)
    converted: Counter = field(default_factory=Counter)
    read: int = 0  # input samples read into this chunk (usable or not)
    raw_bytes: int = 0  # their size in the input tar (for the progress estimate)
    last: bool = False  # the shard ends with this chunk
    shard_error: str | None = None  # why the shard stopped early (with `last`)


def draft_key(data: bytes, resolution: int) -> tuple:
    """Which decode `transforms.decode(open_header(data), resolution)` does: (True, mode, size)
    after the PIL draft it requests, or (False,) when it decodes at full scale. Two resolutions
    with one key get identical pixels from one decode. Reads the header only."""
    probe = open_header(data)
    width, height = probe.size
    short = min(width, height)
    if probe.format != "JPEG" or short < 2 * resolution:  # transforms.decode's rule
        return (False,)
    scale = resolution / short
    probe.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
    return (True, probe.mode, probe.size)


def decode_sample(example: dict, resolutions: tuple[int, ...], crop: str
                  ) -> tuple[str, dict[int, np.ndarray], dict[int, BadSample], str | None]:
    """Raw example -> (prompt, {R: (R, R, 3) uint8}, {R: why R failed}, converted mode).
    Raises BadSample for what fails at every resolution (file, caption, JSON problems)."""
    data = image_bytes(example)
    prompt = parse_prompt(example)
    images, failed, decoded, converted = {}, {}, {}, None
    for r in resolutions:
        try:
            header = open_header(data)
            check_size(header.size, r)
            key = draft_key(data, r)
            if key not in decoded:
                decoded[key] = decode(header, r)
            image, converted = decoded[key]
            images[r] = np.asarray(crop_resize(image, r, crop), dtype=np.uint8)  # (R, R, 3)
        except BadSample as bad:
            failed[r] = bad
    return prompt, images, failed, converted


def output_json(example: dict, prompt: str, shard: str, key: str) -> bytes:
    """The latent sample's KEY.json: the source KEY.json's fields when it is a JSON object,
    with "prompt" set to the caption parse_prompt took (KEY.json's or KEY.txt's: what online
    training reads, so img2dataset's {"caption"} + KEY.txt keeps its caption), plus
    source_shard and source_key. ASCII-escaped, so a lone surrogate in a caption or a key
    read from non-UTF-8 file names cannot fail the write."""
    try:
        meta = json.loads(example["json"]) if example.get("json") is not None else {}
    except (ValueError, RecursionError):  # not JSON or not UTF-8: the caption came from KEY.txt
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    meta.update(prompt=prompt, source_shard=shard, source_key=key)
    return json.dumps(meta).encode("ascii")


def shard_chunks(url: str, resolutions: tuple[int, ...], crop: str, batch_size: int
                 ) -> Iterator[Chunk]:
    """The chunks of one input shard, in order; the last has `last` set."""
    name = shard_name(url)
    chunk = Chunk(name)
    for item in read_shard(url):
        if isinstance(item, ShardIssue):
            if item.kind == "shard_error":
                chunk.shard_error = f"stopped after sample {item.offset}: {item.detail}"
            break
        offset, example = item
        add_sample(chunk, example, offset, resolutions, crop)
        if len(chunk.keys) == batch_size:
            yield chunk
            chunk = Chunk(name)
    chunk.last = True
    yield chunk


def add_sample(chunk: Chunk, example: dict, offset: int, resolutions: tuple[int, ...],
               crop: str) -> None:
    """Decode one raw example into `chunk`, or record why it cannot be used (in place)."""
    key = example.get("__key__") or f"#{offset}"
    chunk.read += 1
    chunk.raw_bytes += sum(512 + len(v) for v in example.values() if isinstance(v, bytes)) + 512
    try:
        prompt, images, failed, converted = decode_sample(example, resolutions, crop)
        if not images:
            raise failed[resolutions[0]]
    except BadSample as bad:
        chunk.bad.append((bad.kind, key, bad.detail))
        return
    chunk.keys.append(key)
    chunk.metas.append(output_json(example, prompt, chunk.shard, key))
    chunk.has.append(tuple(images))
    for r, image in images.items():
        chunk.images.setdefault(r, []).append(image)
    chunk.missing += [(r, bad.kind, key) for r, bad in failed.items()]
    if converted:
        chunk.converted[converted] += 1


class _ChunkStream(IterableDataset):
    """DataLoader worker k reads shards k, k + W, ... of `urls`, each whole and in order."""

    def __init__(self, urls: list[str], resolutions: tuple[int, ...], crop: str, batch_size: int):
        super().__init__()
        self.urls, self.resolutions, self.crop, self.batch_size = (urls, resolutions, crop,
                                                                   batch_size)

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # an async filesystem loop inherited by fork would hang
        mine = self.urls[info.id::info.num_workers] if info else self.urls
        for url in mine:
            yield from shard_chunks(url, self.resolutions, self.crop, self.batch_size)


def _as_is(chunk: Chunk) -> Chunk:
    return chunk


def read_chunks(urls: list[str], plan: EncodePlan, workers: int) -> Iterator[Chunk]:
    """The chunks of `urls`: in process (workers 0) or from DataLoader workers, whose chunks of
    different shards interleave (each shard's chunks stay in order)."""
    m = plan.manifest
    stream = _ChunkStream(urls, m.resolutions, m.crop, plan.batch_size)
    workers = min(workers, len(urls))
    if workers == 0:
        return iter(stream)
    return iter(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_as_is,
                           worker_init_fn=ignore_stop_signals, prefetch_factor=2))


# ----------------------------------------------------------------------------------------------
# Encoding and writing (in the main process)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_chunk(vae: torch.nn.Module, chunk: Chunk, device: torch.device,
                 autocast_dtype: torch.dtype | None) -> dict[int, torch.Tensor]:
    """{R: (n_R, 2z, R/f, R/f) float32 CPU moments} of the chunk's images at each resolution:
    the posterior's mean then (clamped) logvar, from `vae.encode` under autocast."""
    out = {}
    for r, images in chunk.images.items():
        # uint8 to the device, converted there: a quarter of the bytes to copy, and no float
        # conversion on the one host thread that feeds the GPU (stack + conversion measured
        # 142 ms per 32 images at 256 + 512 px on one CPU core, of 196 ms host work a chunk)
        x = to_float(torch.from_numpy(np.stack(images)).to(device))  # (n_R, 3, R, R) in [-1, 1]
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            posterior = vae.encode(x)
        out[r] = torch.cat([posterior.mean, posterior.logvar], 1).float().cpu()  # (n_R, 2z, h, w)
    return out


class ShardOut:
    """An output shard being written as OUT/.NAME.tmp (fixed tar metadata: identical bytes for
    identical input)."""

    def __init__(self, out: Path, name: str):
        self.path, self.tmp = out / name, out / f".{name}.tmp"
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)
        self.samples = 0
        self.bad: Counter = Counter()
        self.missing: dict[int, Counter] = {}
        self.converted: Counter = Counter()  # source image modes converted to RGB
        self.last_key: str | None = None  # the key of the sample written last

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self.tar.addfile(info, io.BytesIO(data))
        self.tar.members = []  # tarfile keeps every member's header otherwise: ~1 KB a sample

    def write(self, chunk: Chunk, moments: dict[int, torch.Tensor], dtype: str) -> None:
        row = Counter()  # next row of each resolution's moments
        for i, (key, meta, has) in enumerate(zip(chunk.keys, chunk.metas, chunk.has)):
            # one key twice in the source, apart (a, bad b, a): with b dropped, the two would be
            # neighbours and read back as one sample; the second is written as KEY~N (N: its
            # index in this shard), so the tar holds the samples the manifest counts
            name = key if key != self.last_key else f"{key}~{self.samples + i}"
            self.add(f"{name}.json", meta)
            for r in has:
                self.add(f"{name}.{moments_extension(r)}", moments_bytes(moments[r][row[r]], dtype))
                row[r] += 1
            self.last_key = name
        self.samples += len(chunk.keys)
        self.bad.update(kind for kind, _, _ in chunk.bad)
        self.converted.update(chunk.converted)
        for r, kind, _ in chunk.missing:
            self.missing.setdefault(r, Counter())[kind] += 1

    def finish(self, state: Path, shard_error: str | None) -> dict:
        """Close, rename to the final name, write the record; returns the record."""
        self.tar.close()
        os.replace(self.tmp, self.path)
        record = {"samples": self.samples, "bytes": self.path.stat().st_size,
                  "bad": dict(sorted(self.bad.items()))}
        if self.missing:
            record["missing"] = {str(r): dict(sorted(c.items()))
                                 for r, c in sorted(self.missing.items())}
        if self.converted:
            record["converted"] = dict(sorted(self.converted.items()))
        if shard_error:
            record["shard_error"] = shard_error
        write_text(state / f"{self.path.name}.json", json.dumps(record, sort_keys=True))
        return record

    def discard(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


@dataclass
class EncodeReport:
    """What one rank did: shards encoded now / found finished, samples and bytes written now."""

    shards: int = 0
    skipped: int = 0
    samples: int = 0
    bytes: int = 0
    bad: Counter = field(default_factory=Counter)


def encode_shards(plan: EncodePlan, vae: torch.nn.Module, *, device: torch.device,
                  autocast_dtype: torch.dtype | None, rank: int = 0, world_size: int = 1,
                  workers: int = 0, progress: Progress | None = None,
                  stopped: Callable[[], str | None] | None = None) -> EncodeReport:
    """Encode this rank's shards (input shards rank, rank + world_size, ...) that are not
    finished yet. `vae` is on `device` and frozen. Raises DataError when OUT cannot be written,
    or when this rank's samples (its finished shards' and those read so far) hold too many bad
    ones (`check_bad_share`, after each chunk, as training checks after each batch); raises
    PeerStopped when `stopped()` (asked after each chunk) gives another rank's error. On any
    error the shards being written are removed (finished ones stay)."""
    mine = list(plan.urls[rank::world_size])
    todo, tally = unfinished(plan, mine)
    report = EncodeReport(skipped=len(mine) - len(todo))
    sizes = dict(zip(plan.urls, plan.sizes))
    todo_bytes = sum(sizes[u] or 0 for u in todo) if all(sizes[u] for u in todo) else None
    open_shards: dict[str, ShardOut] = {}
    read = raw = 0
    try:
        for chunk in read_chunks(todo, plan, workers):
            shard = open_shards.get(chunk.shard) or open_shards.setdefault(
                chunk.shard, ShardOut(plan.out, chunk.shard))
            for kind, key, detail in chunk.bad:
                log.warning("skipped bad sample: shard=%s key=%s kind=%s %s", chunk.shard, key,
                            kind, detail)
            shard.write(chunk, encode_chunk(vae, chunk, device, autocast_dtype),
                        plan.manifest.dtype)
            if chunk.last:
                finish_shard(shard, plan, chunk, report)
                del open_shards[chunk.shard]
            tally.add(chunk_counts(chunk))
            check_bad_share(tally, plan)
            if stopped is not None and (why := stopped()) is not None:
                raise PeerStopped(why)
            read, raw = read + chunk.read, raw + chunk.raw_bytes
            if progress is not None:
                total = round(todo_bytes * read / raw) if todo_bytes and raw else None
                progress(chunk.read, total)
    except OSError as err:
        raise DataError(f"cannot write into {str(plan.out)!r}: {err.strerror or err}") from None
    finally:
        for shard in open_shards.values():
            shard.discard()
    return report


def unfinished(plan: EncodePlan, urls: list[str]) -> tuple[list[str], BadTally]:
    """The input shards of `urls` whose output shard is not finished, and the tally of the
    finished ones' records. A recorded output shard that no longer matches its record (cut,
    overwritten, deleted), or whose remote source stopped early (an outage outlasting
    read_shard's retries), is encoded again, with a log line saying why."""
    todo, tally = [], BadTally()
    for url in urls:
        name = shard_name(url)
        record = recorded(plan, name)
        why = None if record is None else damage(plan.out / name, record)
        if why is None and record is not None and record.get("shard_error") and is_remote(url):
            why = (f"its remote source stopped early last time ({record['shard_error']}); "
                   f"reading it again")
        if record is not None and why is None:
            tally.add(record)
            continue
        if why is not None:
            log.warning("encoding %s again: %s", name, why)
        todo.append(url)
    return todo, tally


def chunk_counts(chunk: Chunk) -> dict:
    """The counts of a chunk as a shard record holds them: samples, bad and missing kinds."""
    missing: dict[str, Counter] = {}
    for r, kind, _ in chunk.missing:
        missing.setdefault(str(r), Counter())[kind] += 1
    return {"samples": len(chunk.keys), "bad": Counter(kind for kind, _, _ in chunk.bad),
            "missing": missing}


def finish_shard(shard: ShardOut, plan: EncodePlan, chunk: Chunk, report: EncodeReport) -> None:
    """Complete one output shard and add it to `report` (in place)."""
    if chunk.shard_error:
        log.warning("shard %s %s", chunk.shard, chunk.shard_error)
    record = shard.finish(plan.out / STATE, chunk.shard_error)
    report.shards += 1
    report.samples += record["samples"]
    report.bytes += record["bytes"]
    report.bad.update(record["bad"])


__all__ = ["STATE", "EncodePlan", "EncodeReport", "PeerStopped", "encode_shards", "finish_output",
           "plan_encode", "prepare_output", "request_stop", "stop_requested", "summary"]
