"""`build_loader`: the infinite, exactly resumable batch iterator the training loop consumes.

    loader = build_loader(cfg.data, batch_size=B, tokenize=tokenize, seed=seed,
                          rank=0, world_size=1, position=None)
    for batch in loader: ...        # image (B,3,H,W) in [-1,1], tokens (B,77), prompt, key,
                                    # shard (the path or URL of each row's shard)
    loader.position()               # JSON-able; pass back as position= to continue exactly
    loader.stats()                  # samples seen, bad samples by kind, conversions

Shards: with `data.workers` = W > 0 a rank runs S = min(W, shards per rank) streams (latent
shards: min(W, samples per rank), as they are split by samples), one per DataLoader worker
(see stream.py). Workers build whole batches; the DataLoader hands them out
round-robin (worker 0, 1, ..., S-1, 0, ...), so batch n of a run comes from stream n mod S.
Each batch carries its stream's state, the main process keeps the latest state of every
stream plus the index of the next stream, and a resumed DataLoader maps its worker k to stream
(next + k) mod S: the round-robin continues where it stopped. `in_process=True` (or W = 0)
runs the same S streams round-robin in this process and yields identical batches.

Empty shards (0 bytes, or a local tar with no member) are dropped before the shards are split
between ranks, and logged once, so every rank decides the same thing from the same files
before training starts; a source with no non-empty shard is a DataError. A remote shard found
empty while streaming is skipped and logged once.

Latent shards (a folder with a `t2i-data encode` manifest, see latent_shards.py) run through
the same streams, windows and positions; their batches carry the stored posterior moments,
`moments` (B, 2z, h, w) float32, instead of `image`. The shard list is the manifest's (a shard
it lists that is missing is an error; other files in the folder are ignored), the manifest
must hold `data.resolution`, and the crop was frozen when encoding, so `data.crop` must match
it and `data.hflip` stay off. A position saved on latent shards is of another kind than one
saved on image shards: one never resumes the other.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i.config import DataConfig
from t2i.data import shapes, shards
from t2i.data.shards import member_order_hint
from t2i.data.errors import DataError
from t2i.data.latent_shards import (LatentManifest, holds_latent_samples, holds_latents,
                                    manifest_path, read_manifest)
from t2i.data.sources import is_empty_shard, resolve_shards, shard_name, without_validation
from t2i.data.stream import (SampleFormat, StreamPlan, Tokenize, fresh_state, image_format,
                             latent_format, stream_batches)
from t2i.data.transforms import Transform, to_float
from t2i.data.workers import ignore_stop_signals
from t2i.rng import generator

log = logging.getLogger("t2i.data")
POSITION_VERSION = 1


def build_loader(cfg: DataConfig, *, batch_size: int, tokenize: Tokenize, seed: int,
                 rank: int = 0, world_size: int = 1, position: dict | None = None,
                 in_process: bool = False, reported: set | None = None, captions: bool = True
                 ) -> "ShardLoader | ShapesLoader":
    """The loader for `cfg.source`: "shapes" (built-in set) or shards (see sources.py).
    `reported`: what was already logged about the source (empty shards, shards that stopped
    early); pass one set to every loader of a run so each line is logged once per run, however
    many loaders read the data (training, the latent-scale measurement, stage 2). `captions`
    False (stage 1: images only): image shards' samples with a missing or bad caption are good
    images, prompt "" (the shapes set and latent shards always have their captions)."""
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    if cfg.source == "shapes":
        return ShapesLoader(cfg, batch_size=batch_size, tokenize=tokenize, seed=seed,
                            rank=rank, world_size=world_size, position=position)
    return ShardLoader(cfg, batch_size=batch_size, tokenize=tokenize, seed=seed, rank=rank,
                       world_size=world_size, position=position, in_process=in_process,
                       reported=reported, manifest=latent_manifest(cfg), captions=captions)


def latent_folder(source: str) -> str | None:
    """The latent-shard folder `source` names, or None for any other source. A local folder is
    one when it holds a manifest, or shards whose first sample has moments (an unfinished
    encode: reading it then reports the missing manifest). Raises DataError when a latent-shard
    folder is one item of a list, or an item is one latent .tar shard (its folder is the
    source)."""
    if source == "shapes":  # the built-in set, never a folder of that name
        return None
    items = [item.strip() for item in source.split(",") if item.strip()]
    for item in items:  # latent shards are read as a folder, with the manifest beside them
        path = Path(item).expanduser()
        if "://" not in item and path.is_file() and holds_latents(item):
            raise DataError(f"data source {item!r} is one latent shard: latent shards are read "
                            f"as their folder, with its manifest.json; give {str(path.parent)!r}")
    latent = [item for item in items if "://" not in item and
              (manifest_path(Path(item).expanduser()).is_file() or holds_latent_samples(item))]
    if latent and len(items) > 1:
        raise DataError(f"data source {source!r}: {latent[0]!r} holds latent shards, which are "
                        f"read on their own: give that one folder")
    return latent[0] if latent else None


def latent_manifest(cfg: DataConfig) -> LatentManifest | None:
    """The manifest of the latent-shard folder `cfg.source` (None for other sources), checked
    against the data settings. Raises DataError when the manifest is missing or unreadable,
    lacks `cfg.resolution`, or froze another crop than `cfg.crop`, or when `cfg.hflip` is on."""
    folder = latent_folder(cfg.source)
    if folder is None:
        return None
    where = str(manifest_path(folder))
    if not manifest_path(Path(folder).expanduser()).is_file():
        raise DataError(f"data source {folder!r} holds latent shards but no manifest.json "
                        f"(an unfinished t2i-data encode? run the same command again to finish "
                        f"it)")
    manifest = read_manifest(Path(folder).expanduser())
    if cfg.resolution not in manifest.resolutions:
        have = ", ".join(str(r) for r in manifest.resolutions)
        raise DataError(f"{where!r} holds latents at resolution {have}, not data.resolution "
                        f"{cfg.resolution}: train at {have} (--set data.resolution=...) or "
                        f"encode with --resolution {cfg.resolution}")
    if cfg.crop != manifest.crop or cfg.hflip:
        raise DataError(f"{where!r}: the crop was frozen when encoding ({manifest.crop}, no "
                        f"flip); train from these latents with data.crop={manifest.crop} and "
                        f"data.hflip=false (now data.crop={cfg.crop}, "
                        f"data.hflip={str(cfg.hflip).lower()})")
    return manifest


def manifest_shards(folder: str, manifest: LatentManifest) -> tuple[tuple[str, ...], list[str]]:
    """(paths of the manifest's shards holding samples, in the order resolve_shards gives a
    folder, names of those it lists with none). Raises DataError naming a listed shard that is
    missing or whose size is not the manifest's (cut or replaced: its sample count, which the
    split by samples uses, would be wrong), or when no shard holds a sample."""
    base = Path(folder).expanduser()
    paths = sorted(str(base / name) for name in manifest.shards)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataError(f"{missing[0]!r} is listed in {str(manifest_path(base))!r} but missing"
                        f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: run "
                        f"the t2i-data encode command that made the folder again to encode it "
                        f"again")
    for path in paths:  # the split by samples trusts the counts: a changed file breaks it
        recorded = manifest.shards[shard_name(path)].get("bytes")
        size = Path(path).stat().st_size
        if recorded is not None and size != recorded:
            raise DataError(f"{path!r} is {size:,} bytes, {str(manifest_path(base))!r} says "
                            f"{recorded:,}: it changed since t2i-data encode wrote it; run "
                            f"the t2i-data encode command that made the folder again to encode "
                            f"it again")
    empty = [shard_name(p) for p in paths if not manifest.shards[shard_name(p)]["samples"]]
    urls = tuple(p for p in paths if shard_name(p) not in empty)
    if not urls:
        raise DataError(f"data source {folder!r} has no usable sample: its manifest counts "
                        f"no sample in any of its {len(paths)} shard(s)")
    return urls, empty


class DataStats:
    """Running counts of good and bad samples, checked against data.max_bad_fraction."""

    def __init__(self, saved: dict | None = None, reported: set | None = None) -> None:
        saved = saved or {}
        self.reported = set() if reported is None else reported  # lines logged (see build_loader)
        self.good = int(saved.get("good", 0))
        self.bad = Counter(saved.get("bad_by_kind", {}))
        self.converted = Counter(saved.get("converted", {}))
        self.shard_errors = int(saved.get("shard_errors", 0))
        self.empty_shards = set(saved.get("empty_shards", []))

    def as_dict(self) -> dict:
        bad = sum(self.bad.values())
        samples = self.good + bad
        return {"samples": samples, "good": self.good, "bad": bad,
                "bad_fraction": bad / samples if samples else 0.0,
                "bad_by_kind": dict(sorted(self.bad.items())),
                "converted": dict(sorted(self.converted.items())),
                "shard_errors": self.shard_errors, "empty_shards": sorted(self.empty_shards)}

    def add(self, meta: dict) -> None:
        self.good += meta["good"]
        self.converted.update(meta["converted"])
        for kind, shard, key, detail in meta["bad"]:
            if kind == "shard_error":
                self.shard_errors += 1
                if first_report(self.reported, ("shard_error", shard, key, detail)):
                    log.warning("shard %s stopped reading %s: %s", shard, key, detail)
            elif kind == "empty_shard":
                if (shard_name(shard) not in self.empty_shards
                        and first_report(self.reported, ("empty_shard", shard_name(shard)))):
                    log.warning("skipping empty shard %s", shard)
                self.empty_shards.add(shard_name(shard))
            else:
                self.bad[kind] += 1  # counted at every pass, logged at the first
                if first_report(self.reported, ("bad", shard, key, kind)):
                    log.warning("skipped bad sample: shard=%s key=%s kind=%s %s", shard, key,
                                kind, detail)

    def check(self, cfg: DataConfig) -> None:
        stats = self.as_dict()
        if stats["samples"] >= cfg.bad_check_after and stats["bad_fraction"] > cfg.max_bad_fraction:
            kinds = ", ".join(f"{k} {n}" for k, n in self.bad.most_common(3))
            hint = member_order_hint(self.bad)
            raise DataError(f"data source {cfg.source!r}: {stats['bad']} of {stats['samples']} "
                            f"samples were bad ({stats['bad_fraction']:.1%} > "
                            f"data.max_bad_fraction {cfg.max_bad_fraction:g}; {kinds})"
                            f"{'; ' + hint if hint else ''}")


def _transform(cfg: DataConfig) -> Transform:
    """The image transform of `cfg` (a DataConfig checks its numeric settings when built)."""
    try:
        return Transform(cfg.resolution, cfg.crop, cfg.hflip)
    except ValueError as err:
        raise DataError(str(err)) from None


def _format(cfg: DataConfig, manifest: LatentManifest | None, captions: bool = True
            ) -> SampleFormat:
    """Images through `cfg`'s transform (captions required unless `captions` is False), or the
    manifest's moments at `cfg.resolution`."""
    transform = _transform(cfg)
    if manifest is None:
        return image_format(transform, captions)
    h = cfg.resolution // manifest.downsample_factor
    return latent_format(cfg.resolution, (2 * manifest.z_channels, h, h))


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------


class _StreamsDataset(IterableDataset):
    """DataLoader worker k runs stream (first + k) mod S; errors travel as a record so the main
    process raises one clean DataError instead of a worker traceback."""

    def __init__(self, plans: list[StreamPlan], states: list[dict], first: int,
                 fmt: SampleFormat, batch_size: int, buffer: int, tokenize: Tokenize):
        super().__init__()
        self.plans, self.states, self.first = plans, states, first
        self.fmt, self.batch_size, self.buffer, self.tokenize = fmt, batch_size, buffer, tokenize

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None:
            import fsspec.asyn

            fsspec.asyn.reset_lock()  # an async filesystem loop inherited by fork would hang
        s = (self.first + (info.id if info else 0)) % len(self.plans)
        try:
            yield from stream_batches(self.plans[s], self.states[s], self.fmt,
                                      self.batch_size, self.buffer, self.tokenize)
        except DataError as err:
            yield {"_error": str(err)}


def _round_robin(streams: list[Iterator[dict]], first: int) -> Iterator[dict]:
    s = first
    while True:
        yield next(streams[s])
        s = (s + 1) % len(streams)


class ShardLoader:
    """Batches from webdataset shards (local, URLs or the Hub), or from the latent-shard folder
    whose `manifest` latent_manifest returned; see the module docstring."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, tokenize: Tokenize, seed: int,
                 rank: int, world_size: int, position: dict | None, in_process: bool = False,
                 reported: set | None = None, manifest: LatentManifest | None = None,
                 captions: bool = True):
        self.cfg, self.batch_size, self.tokenize = cfg, batch_size, tokenize
        self.in_process = in_process
        self.format = _format(cfg, manifest, captions)
        reported = set() if reported is None else reported
        self.urls, empty = (usable_shards(cfg.source, cfg.subset, reported) if manifest is None
                            else manifest_shards(cfg.source, manifest))
        self.urls = without_validation(self.urls, cfg.source, cfg.subset, cfg.val_source,
                                       cfg.val_fraction)  # held out for the validation loss
        # latent shards are split by samples (their counts are known), unless the run being
        # resumed was saved before that split existed: it goes on with whole shards
        self.counts = (tuple(int(manifest.shards[shard_name(u)]["samples"]) for u in self.urls)
                       if manifest is not None
                       and (not isinstance(position, dict) or "split" in position) else None)
        units = len(self.urls) if self.counts is None else sum(self.counts)
        if units < world_size:
            raise DataError(f"data source {cfg.source!r} has {units} "
                            f"{'shard' if self.counts is None else 'sample'}(s), fewer than the "
                            f"{world_size} ranks that must each read their own")
        streams = max(1, min(cfg.workers, units // world_size))
        if rank == 0 and self.counts is None:
            warn_uneven(len(self.urls), world_size, streams, reported)
        listed = self.urls if self.counts is None else [f"{u} {n}" for u, n in
                                                         zip(self.urls, self.counts)]
        digest = hashlib.sha1("\n".join(listed).encode()).hexdigest()[:16]
        self.identity = {"kind": "shards", "version": POSITION_VERSION, "source": cfg.source,
                         "num_shards": len(self.urls), "shards_digest": digest, "seed": seed,
                         "rank": rank, "world_size": world_size, "streams": streams,
                         "shuffle_buffer": cfg.shuffle_buffer, "resolution": cfg.resolution}
        if manifest is not None:  # moments of another VAE or dtype are other data
            self.identity.update(kind="latent_shards", vae_sha256=manifest.vae_sha256,
                                 moments_dtype=manifest.dtype)
        if self.counts is not None:
            self.identity["split"] = "samples"
        if position is None:
            self._position = {**self.identity, "batches": 0, "next_stream": 0,
                              "stream_states": [fresh_state() for _ in range(streams)]}
        else:
            check_position(position, self.identity)
            self._position = {**position, "stream_states": [dict(s) for s in
                                                            position["stream_states"]]}
        self._stats = DataStats(self._position.get("stats"), reported)
        self._stats.empty_shards.update(empty)

    def position(self) -> dict:
        """The data position after the batches yielded so far (JSON-able)."""
        states = self._position["stream_states"]
        return {**self._position, "epoch": min(s["epoch"] for s in states),
                "stream_states": [dict(s) for s in states], "stats": self._stats.as_dict()}

    def stats(self) -> dict:
        return self._stats.as_dict()

    def __iter__(self) -> Iterator[dict]:
        streams = self.identity["streams"]
        plans = [StreamPlan(self.urls, self.identity["seed"], self.identity["rank"],
                            self.identity["world_size"], streams, s, self.counts)
                 for s in range(streams)]
        states = [dict(s) for s in self._position["stream_states"]]
        first = self._position["next_stream"]
        args = (self.format, self.batch_size, self.cfg.shuffle_buffer, self.tokenize)
        if self.cfg.workers > 0 and not self.in_process:
            if any("://" in url for url in self.urls):
                shards.preload()  # import `datasets` once here, not in every forked worker
            dataset = _StreamsDataset(plans, states, first, *args)
            source: Iterator[dict] = iter(DataLoader(
                dataset, batch_size=None, num_workers=streams, worker_init_fn=ignore_stop_signals,
                pin_memory=torch.cuda.is_available(), prefetch_factor=2))
        else:
            source = _round_robin([stream_batches(p, st, *args) for p, st in zip(plans, states)],
                                  first)
        for batch in source:
            if "_error" in batch:
                raise DataError(batch["_error"])
            meta = batch.pop("_meta")
            self._stats.add(meta)
            self._position["stream_states"][meta["stream"]] = meta["state"]
            self._position["next_stream"] = (meta["stream"] + 1) % streams
            self._position["batches"] += 1
            self._stats.check(self.cfg)
            yield batch


def merged_stats(per_rank: list[dict]) -> dict:
    """The ranks' `stats()` dicts as one: counts summed, empty shards joined, the bad fraction
    of the sums (what metrics.jsonl's bad_samples reports for the whole run under torchrun)."""
    counts = ("samples", "good", "bad", "shard_errors")
    out: dict = {key: sum(s.get(key, 0) for s in per_rank) for key in counts}
    out["bad_fraction"] = out["bad"] / out["samples"] if out["samples"] else 0.0
    for key in ("bad_by_kind", "converted"):
        total: Counter = Counter()
        for s in per_rank:
            total.update(s.get(key, {}))
        out[key] = dict(sorted(total.items()))
    out["empty_shards"] = sorted({name for s in per_rank for name in s.get("empty_shards", [])})
    return out


def first_report(reported: set, line: tuple) -> bool:
    """True the first time `line` is seen in `reported` (then recorded): log it only then."""
    if line in reported:
        return False
    reported.add(line)
    return True


def usable_shards(source: str, subset: str, reported: set | None = None
                  ) -> tuple[tuple[str, ...], list[str]]:
    """(URLs of the shards that may hold samples, names of the empty ones, logged once per
    `reported`, see build_loader). Raises DataError when the source names no shards or only
    empty ones."""
    found = resolve_shards(source, subset)
    is_empty = [is_empty_shard(s) for s in found]
    empty = [shard_name(s.url) for s, no in zip(found, is_empty) if no]
    urls = tuple(s.url for s, no in zip(found, is_empty) if not no)
    if not urls:
        raise DataError(f"data source {source!r} has no usable sample: all {len(found)} "
                        f"shard(s) are empty")
    if empty and first_report(set() if reported is None else reported,
                              ("empty_shards", source, tuple(empty))):
        shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
        log.warning("data source %r: skipping %d empty shard(s): %s", source, len(empty), shown)
    return urls, empty


# What to change so that a saved data position fits again (the run's config.json holds the
# saved values: leaving an option out on resume keeps them).
RESUME_FIXES = {"batch_size": "drop --batch-size to resume",
               "seed": "drop --seed (or the train.seed override) to resume",
                "world_size": "resume with the same number of processes",
                "rank": "resume with the same number of processes",
                "streams": "drop --workers to resume",
                "resolution": "drop the data.resolution override to resume",
                "shuffle_buffer": "drop the data.shuffle_buffer override to resume",
                "source": "resume on the same data", "num_shards": "resume on the same shards",
                "shards_digest": "resume on the same shards",
                "vae_sha256": "resume on latent shards of the same VAE",
                "moments_dtype": "resume on latent shards of the same --dtype"}


def warn_uneven(shards: int, world_size: int, streams: int, reported: set) -> None:
    """Log once per run when image `shards` (dealt whole) do not split evenly over world_size
    x streams: every stream gives batches at one rate, so one with fewer shards starts its next
    pass sooner, and within a pass of the data some samples come round twice, others not yet. Over many passes
    it evens out: each pass deals the shards to the streams in a new order, so every shard is
    read as often as the others (simulated for 46 shards over 32 streams, 20000 shard reads
    each: every shard within 0.7% of the mean)."""
    readers = world_size * streams
    if shards % readers == 0 or not first_report(reported, ("uneven", shards, readers)):
        return
    log.warning("%d shards over %d rank(s) x %d stream(s): each stream reads %d or %d of them "
                "per pass, so samples are not seen exactly once per pass of the data (over "
                "many passes it evens out); a shard count that is a multiple of %d "
                "(data.workers and the process count decide it) avoids that, and so do latent "
                "shards (t2i-data encode), which are split by samples", shards,
                world_size, streams, shards // readers,
                shards // readers + 1, readers)


def check_position(position: dict, identity: dict) -> None:
    """A saved position must come from the same data, seed, rank layout and shuffle."""
    if not isinstance(position, dict) or position.get("kind") != identity["kind"]:
        raise DataError(f"the saved data position is not a {identity['kind']!r} position "
                        f"(data.source changed?)")
    for key, now in identity.items():
        saved = position.get(key)
        if saved != now:
            fix = RESUME_FIXES.get(key, "resume with the settings the run was saved with")
            # the loader's seed is derived from train.seed: its value would mean nothing here
            was = ("another train.seed" if key == "seed" else f"{key}={saved!r}, now "
                   f"{key}={now!r}")
            raise DataError(f"cannot resume the data position exactly: it was saved with "
                            f"{was}; {fix}, or start a new run with another --out")


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


class ShapesLoader:
    """The built-in shapes set. Global batch n (batch_size x world_size rows) is drawn from
    generator(seed, shapes, 0, n) on every rank and rank r keeps rows r*b:(r+1)*b, so N ranks
    see exactly the batch one process with the N-fold batch sees (disjoint rows per rank), and
    the position is one integer. Held-out colour+shape pairs never appear. Never flipped."""

    def __init__(self, cfg: DataConfig, *, batch_size: int, tokenize: Tokenize, seed: int,
                 rank: int, world_size: int, position: dict | None):
        if cfg.hflip:
            raise DataError("data.hflip must stay off for the shapes set: a flip swaps left and "
                            "right and the caption would lie")
        _transform(cfg)  # same checks of the settings as for shards
        self.cfg, self.batch_size, self.tokenize = cfg, batch_size, tokenize
        self.spec = shapes.ShapesSpec(resolution=cfg.resolution)
        self.identity = {"kind": "shapes", "version": POSITION_VERSION, "seed": seed,
                         "rank": rank, "world_size": world_size, "batch_size": batch_size,
                         "resolution": cfg.resolution}
        if position is not None:
            check_position(position, self.identity)
        self._batches = int(position["batches"]) if position else 0
        self._token_cache: dict[str, torch.Tensor] = {}

    def position(self) -> dict:
        return {**self.identity, "batches": self._batches}

    def stats(self) -> dict:
        samples = self._batches * self.batch_size
        return {"samples": samples, "good": samples, "bad": 0, "bad_fraction": 0.0,
                "bad_by_kind": {}, "converted": {}, "shard_errors": 0, "empty_shards": []}

    def tokens(self, prompts: list[str]) -> torch.Tensor:
        """Tokenize with a cache: the shapes set has only a few thousand distinct captions."""
        missing = sorted({p for p in prompts if p not in self._token_cache})
        if missing:
            for prompt, row in zip(missing, torch.as_tensor(self.tokenize(missing))):
                self._token_cache[prompt] = row.long()
        return torch.stack([self._token_cache[p] for p in prompts])  # (B, 77)

    def batch(self, n: int) -> dict:
        b, rank = self.batch_size, self.identity["rank"]
        g = generator(self.identity["seed"], "shapes", 0, n)  # the 0 (once a rank) keeps old streams
        rows = slice(rank * b, (rank + 1) * b)
        images, prompts, _ = shapes.sample_batch(self.spec, b * self.identity["world_size"], g, rows)
        return {"image": to_float(images), "tokens": self.tokens(prompts), "prompt": prompts,
                "key": [f"shapes-{n}-{j}" for j in range(rows.start, rows.stop)]}

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch(self._batches)
            self._batches += 1
            yield batch


Loader = ShardLoader | ShapesLoader
