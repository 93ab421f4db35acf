"""One data stream: a deterministic, exactly resumable sequence of batches from shard files.

A rank's data is split into S streams (S = number of DataLoader workers, at least 1); stream s
of rank r reads, in epoch e,

    order_e = permutation of all shards (seed, e)       same on every rank
    shards  = order_e[r::world_size][s::S]              disjoint across ranks and streams

When every shard's sample count is known (latent shards: the encode manifest counts them) the
split is by samples instead: the epoch's shards, in order_e, are laid end to end and reader
g = r * S + s of the R = world_size * S readers takes samples [g N / R, (g + 1) N / R) of the N,
a run of segments (shard, start, stop). Every reader then reads N / R samples a pass (within
one), so the streams finish their passes together and each sample is read exactly once a pass;
with whole shards, a stream dealt fewer shards starts its next pass early (see loader.py).

Shuffling is a window shuffle over undecoded samples: read up to `buffer` raw samples (JPEG
bytes, not pixels), emit them in a permutation seeded by where the window starts, read the next
window. Unlike a rolling buffer, a window is fully described by its start, so the whole state of
a stream is four integers:

    epoch, shard (index into this stream's shards, or segments, for the epoch), offset (samples
    into that shard, from its first sample, where the current window starts), taken (window
    entries already consumed)

Resuming re-reads the current window's bytes (skipping `offset` samples without decoding: in
a local uncompressed tar by seeking past them, see shards.read_from), skips `taken` entries and
continues, giving exactly the batches an uninterrupted run gives.
Random crop and flip are drawn from a seed derived from (seed, epoch, shard, offset) of each
sample, so they too survive a resume.

What a raw sample becomes is the stream's `SampleFormat`: an image (decoded, cropped, stacked
as batch["image"] (B, 3, H, W)) for image shards, the stored posterior moments (stacked as
batch["moments"] (B, 2z, h, w) float32) for latent shards (see latent_shards.py). Everything
else (shard order, windows, positions, bad-sample accounting) is the same for both.

An epoch in which a stream's shards give no usable sample (say its one shard is empty) is not
an error: the stream goes on to its next epoch. Only a stream that has read every shard of the
source without one usable sample raises DataError: then the whole source has none, whichever
rank finds it. (Empty local shards are already dropped before training starts, see loader.py.)
A remote source is read ahead by a thread (read_ahead.py: the next window arrives while this one
is decoded; the items and their order are unchanged). A source that stops giving samples
part-way (an hf:// or NFS outage, deleted files) is retried:
after a pass over the stream's shards that met read failures and no usable sample, the stream
waits RETRY_DELAYS_S[k] seconds and reads on; one more such pass in a row raises DataError (the
run's last checkpoint is intact), instead of spinning on failing reads forever.
"""

from __future__ import annotations

import functools
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from t2i.data.errors import BadSample, DataError
from t2i.data.latent_shards import decode_latent_example
from t2i.data.read_ahead import read_ahead
from t2i.data.shards import ShardIssue, decode_example, member_order_hint, read_shard
from t2i.data.sources import is_remote, shard_name
from t2i.data.transforms import Transform, to_float
from t2i.rng import derive_seed

Tokenize = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class SampleFormat:
    """How a raw example becomes one batch row: `decode(example, aug_seed)` -> (row, prompt,
    converted mode or None), raising BadSample; `collate(rows)` stacks the rows of a batch
    into batch[`column`]."""

    column: str
    decode: Callable[[dict, int], tuple[Any, str, str | None]]
    collate: Callable[[list], torch.Tensor]


def image_format(transform: Transform, captions: bool = True) -> SampleFormat:
    """Image shards: rows (H, W, 3) uint8 -> batch["image"] (B, 3, H, W) float32 in [-1, 1].
    `captions` False: a missing or bad caption is no bad sample (prompt "", see
    shards.decode_example)."""
    return SampleFormat("image", functools.partial(decode_image_row, transform, captions),
                        stack_images)


def latent_format(resolution: int, shape: tuple[int, int, int]) -> SampleFormat:
    """Latent shards: the moments at `resolution`, each of `shape` (2z, h, w) -> batch["moments"]
    (B, 2z, h, w) float32."""
    return SampleFormat("moments", functools.partial(decode_latent_row, resolution, shape),
                        stack_moments)


def decode_image_row(transform: Transform, captions: bool, example: dict, aug_seed: int
                     ) -> tuple[np.ndarray, str, str | None]:
    return decode_example(example, transform, aug_seed, captions)


def decode_latent_row(resolution: int, shape: tuple[int, int, int], example: dict,
                      aug_seed: int) -> tuple[torch.Tensor, str, None]:
    del aug_seed  # the crop was frozen when the shards were encoded
    moments, prompt = decode_latent_example(example, resolution, shape)
    return moments, prompt, None


def stack_images(rows: list[np.ndarray]) -> torch.Tensor:
    return to_float(np.stack(rows))  # (B, 3, H, W) in [-1, 1]


def stack_moments(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(rows)  # (B, 2z, h, w) float32


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard (stop None: to the shard's end)."""

    url: str
    start: int = 0
    stop: int | None = None


@dataclass(frozen=True)
class StreamPlan:
    """Which shards (or segments of them) stream `stream` of rank `rank` reads in each epoch.
    `counts` (the sample count of each of `urls`, or None) selects the split by samples."""

    urls: tuple[str, ...]
    seed: int
    rank: int = 0
    world_size: int = 1
    streams: int = 1
    stream: int = 0
    counts: tuple[int, ...] | None = None

    def segments(self, epoch: int) -> list[Segment]:
        order = epoch_order(len(self.urls), self.seed, epoch)
        if self.counts is None:
            mine = order[self.rank::self.world_size][self.stream::self.streams]
            return [Segment(self.urls[i]) for i in mine]
        readers, total = self.world_size * self.streams, sum(self.counts)
        reader = self.rank * self.streams + self.stream
        return sample_range([(self.urls[i], self.counts[i]) for i in order],
                            reader * total // readers, (reader + 1) * total // readers)

    def shards(self, epoch: int) -> list[str]:
        return [segment.url for segment in self.segments(epoch)]


def sample_range(shards: list[tuple[str, int]], first: int, end: int) -> list[Segment]:
    """Samples [first, end) of `shards` ((url, sample count) laid end to end) as segments."""
    segments, base = [], 0
    for url, count in shards:
        start, stop = max(first - base, 0), min(end - base, count)
        if start < stop:
            segments.append(Segment(url, start, None if stop == count else stop))
        base += count
    return segments


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of an epoch (identical on every rank)."""
    rng = np.random.default_rng(derive_seed(seed, "shard-order", epoch))
    return rng.permutation(num_shards).tolist()


RETRY_DELAYS_S = (1.0, 2.0, 4.0, 8.0, 16.0)  # waits after failed passes, then DataError


def fresh_state() -> dict:
    return {"epoch": 0, "shard": 0, "offset": 0, "taken": 0}


def read_epoch(segments: list[Segment], shard: int, offset: int
               ) -> Iterator[tuple[int, int, dict] | tuple[int, ShardIssue]]:
    """(segment index, offset in its shard, raw example) from (shard, offset) to the end of the
    epoch; a shard that fails part way or is empty yields (segment index, ShardIssue) and
    reading moves on. `offset` counts from the shard's first sample, not the segment's."""
    for i in range(shard, len(segments)):
        segment = segments[i]
        begin = max(offset, segment.start) if i == shard else segment.start
        for item in read_shard(segment.url, begin):
            if isinstance(item, ShardIssue):
                yield i, item
                break
            if segment.stop is not None and item[0] >= segment.stop:
                break
            yield i, item[0], item[1]


def take_window(reader: Iterator, buffer: int) -> tuple[list[tuple[int, int, dict]], list]:
    """The next `buffer` raw samples (fewer at the end of the epoch) and shard issues met."""
    window: list[tuple[int, int, dict]] = []
    errors: list[ShardIssue] = []
    for item in reader:
        if len(item) == 2:
            errors.append(item[1])
            continue
        window.append(item)
        if len(window) >= buffer:
            break
    return window, errors


def window_order(seed: int, epoch: int, url: str, offset: int, size: int) -> list[int]:
    rng = np.random.default_rng(derive_seed(seed, "window", epoch, shard_name(url), offset))
    return rng.permutation(size).tolist()


class _Pending:
    """Samples collected for the next batch plus what happened on the way."""

    def __init__(self) -> None:
        self.rows: list = []  # decoded by the stream's SampleFormat
        self.prompts: list[str] = []
        self.keys: list[str] = []
        self.shards: list[str] = []  # shard location (path or URL) of each row: keys repeat
        # across shards, and so do shard file names across folders (data_000000.tar)
        self.bad: list[tuple[str, str, str, str]] = []  # (kind, shard, key, detail)
        self.converted: Counter = Counter()

    def summary(self) -> str:
        """The bad samples and shard issues collected, by kind (for an error message)."""
        kinds = Counter(kind for kind, *_ in self.bad)
        return ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()) or "nothing read"

    def batch(self, fmt: SampleFormat, tokenize: Tokenize, meta: dict) -> dict:
        tokens = torch.as_tensor(tokenize(self.prompts), dtype=torch.long)  # (B, 77)
        return {fmt.column: fmt.collate(self.rows),
                "tokens": tokens, "prompt": self.prompts, "key": self.keys, "shard": self.shards,
                "_meta": {**meta, "bad": self.bad, "converted": dict(self.converted),
                          "good": len(self.rows)}}


def stream_batches(plan: StreamPlan, state: dict, fmt: SampleFormat, batch_size: int,
                   buffer: int, tokenize: Tokenize) -> Iterator[dict]:
    """Infinite batches of one stream starting at `state`. Each batch carries `_meta` with the
    stream's state after it, the bad samples and shard issues met since the previous batch and
    the conversions. Raises DataError once the stream has read every shard of the source
    without a usable sample (see the module docstring)."""
    epoch, shard, offset, taken = state["epoch"], state["shard"], state["offset"], state["taken"]
    pending = _Pending()
    buffer = max(1, buffer)
    usable = False  # met a usable sample: the source has some, never an error then
    dry: set[str] = set()  # shards whose reads (whole or a segment) gave no usable sample yet
    failed_passes = 0  # passes in a row with read failures and no usable sample, once usable
    while True:
        segments = plan.segments(epoch)
        shards = [segment.url for segment in segments]
        whole_epoch = (shard, offset, taken) == (0, 0, 0)  # a resumed one skips samples
        reader = read_epoch(segments, shard, offset)
        if any(map(is_remote, shards)):  # remote: the next window is read while this decodes
            reader = read_ahead(reader, buffer)
        was_usable, epoch_usable, read_failed = usable, False, False
        while True:
            window, issues = take_window(reader, buffer)
            read_failed |= bool(issues)
            if taken == 0:  # a resumed window already reported its shard issues
                pending.bad += [(e.kind, e.url, f"after sample {e.offset}", e.detail)
                                for e in issues]
            if not window:
                break
            shard, offset = window[0][0], window[0][1]
            order = window_order(plan.seed, epoch, shards[shard], offset, len(window))
            for j in range(taken, len(window)):
                i, o, example = window[order[j]]
                good = add_sample(pending, plan.seed, epoch, shards[i], o, example, fmt)
                usable, epoch_usable = usable or good, epoch_usable or good
                if len(pending.rows) == batch_size:
                    position = {"epoch": epoch, "shard": shard, "offset": offset,
                                "taken": j + 1, "shard_name": shard_name(shards[shard])}
                    yield pending.batch(fmt, tokenize, {"stream": plan.stream, "state": position})
                    pending = _Pending()
            taken = 0
        if whole_epoch and not usable:
            dry.update(shards)
        if dry >= set(plan.urls):
            hint = member_order_hint(kind for kind, *_ in pending.bad)
            raise DataError(f"the data source has no usable sample: every one of its "
                            f"{len(plan.urls)} shard(s) ({shard_name(plan.urls[0])}, ...) was "
                            f"read and gave only {pending.summary()}"
                            + (f"; {hint}" if hint else ""))
        failed_passes = failed_passes + 1 if was_usable and read_failed and not epoch_usable else 0
        wait_before_next_pass(failed_passes, shards, pending)
        epoch, shard, offset, taken = epoch + 1, 0, 0, 0


def wait_before_next_pass(failed_passes: int, shards: list[str], pending: _Pending) -> None:
    """Sleep RETRY_DELAYS_S[failed_passes - 1] seconds after a failed pass (none after a good
    one). Raises DataError when the passes have failed once more than there are delays."""
    if failed_passes > len(RETRY_DELAYS_S):
        raise DataError(f"the data source stopped giving usable samples: {failed_passes} passes "
                        f"in a row over shards it read before ({shard_name(shards[0])}, ...) "
                        f"gave only {pending.summary()}; the last checkpoint is intact: resume "
                        f"when the source is back")
    if failed_passes:
        time.sleep(RETRY_DELAYS_S[failed_passes - 1])


def add_sample(pending: _Pending, seed: int, epoch: int, url: str, offset: int, example: dict,
               fmt: SampleFormat) -> bool:
    """Decode one raw example into `pending` (or record it as bad); True when it was usable."""
    key = example.get("__key__") or f"#{offset}"
    try:
        aug = derive_seed(seed, "aug", epoch, shard_name(url), offset)
        row, prompt, converted = fmt.decode(example, aug)
    except BadSample as bad:
        pending.bad.append((bad.kind, url, key, bad.detail))
        return False
    pending.rows.append(row)
    pending.prompts.append(prompt)
    pending.keys.append(key)
    pending.shards.append(url)
    if converted:
        pending.converted[converted] += 1
    return True
