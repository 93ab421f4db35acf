"""`remote-read`: samples/s of a stream over a remote source, read ahead by a thread
(t2i/data/read_ahead.py) against read in turn with decoding, in the same interleaved run.

The "remote" shards are local 512 px JPEG shards (~100 KB each, the `data` case's generator)
served through a stand-in for `shards.open_shard` that returns at most CHUNK (64 KiB) per read
call and sleeps `delay_ms` in each: a connection of 64 KiB / delay (1, 2, 4 ms: about 64, 32,
16 MB/s, around the rate at which reading and the 512 -> 256 decode take similar time on one
CPU core). tarfile asks a member's bytes in one read, so real HTTP reads are this large; with
8 KiB reads the reading thread waits for the GIL at every call and read-ahead gained 1.01-1.08x
only. One stream in the training process (data.workers 0), shuffle windows of 64 samples.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

from bench.cases.data import write_shards
from bench.core import BenchContext, add_ratios, register_case, result_row, time_alternating
from t2i.config import DataConfig
from t2i.data import build_loader, shards, stream


CHUNK = 65536  # bytes per read call


class SlowFile(io.RawIOBase):
    """The bytes of `data`, at most CHUNK per read call, `delay_s` per call."""

    def __init__(self, data: bytes, delay_s: float):
        self.data, self.pos, self.delay_s = data, 0, delay_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        time.sleep(self.delay_s)
        n = min(len(buffer), CHUNK, len(self.data) - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@contextlib.contextmanager
def served(folder: Path, delay_s: float, read_ahead: bool) -> Iterator[None]:
    """https://bench.invalid/NAME opens folder/NAME slowly; `read_ahead` False reads in turn."""
    opened, ahead = shards.open_shard, stream.read_ahead

    def open_remote(url: str):
        if "://" not in url:
            return opened(url)
        return io.BufferedReader(SlowFile((folder / url.rsplit("/", 1)[1]).read_bytes(),
                                          delay_s), buffer_size=CHUNK)

    shards.open_shard = open_remote
    if not read_ahead:
        stream.read_ahead = lambda items, size: items
    try:
        yield
    finally:
        shards.open_shard, stream.read_ahead = opened, ahead


def reader(folder: Path, names: list[str], delay_s: float, read_ahead: bool, samples: int
           ) -> Callable[[], int]:
    source = ",".join(f"https://bench.invalid/{name}" for name in names)
    cfg = DataConfig(source=source, resolution=256, shuffle_buffer=64, workers=0)

    def run() -> int:
        with served(folder, delay_s, read_ahead):
            loader = build_loader(cfg, batch_size=16, seed=0, in_process=True,
                                  tokenize=lambda p: torch.zeros(len(p), 77, dtype=torch.long))
            return sum(len(b["key"]) for b, _ in zip(loader, range(samples // 16)))

    return run


@register_case("remote-read")
def remote_read_case(ctx: BenchContext) -> list[dict]:
    samples = 32 if ctx.quick else 256
    delays_ms = (2.0,) if ctx.quick else (1.0, 2.0, 4.0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        names = [Path(f).name for f in write_shards(folder, samples, 2)]
        for delay_ms in delays_ms:
            fns = {f"read in turn, {delay_ms:g} ms/64 KiB": reader(folder, names, delay_ms / 1e3,
                                                                  False, samples),
                   f"read ahead, {delay_ms:g} ms/64 KiB": reader(folder, names, delay_ms / 1e3,
                                                                True, samples)}
            stats = time_alternating(fns, ctx=ctx, warmup=0,
                                     repeats=1 if ctx.quick else min(ctx.repeats, 3))
            group = [result_row("remote-read", name, s, samples=samples,
                                samples_per_sec=samples / s["median_s"], delay_ms=delay_ms)
                     for name, s in stats.items()]
            for row in group:
                row["group"] = f"{delay_ms:g} ms"
            add_ratios(group, f"read in turn, {delay_ms:g} ms/64 KiB", group="group")
            rows += group
    return rows
