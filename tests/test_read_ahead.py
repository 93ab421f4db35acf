"""A remote source is read ahead by a thread (t2i/data/read_ahead.py) so the next shuffle window
arrives while the current one is decoded. The items, their order, errors and the batches a
stream gives are those of the plain reader; the thread reads ahead without being asked and
stops when the stream is closed."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest
import torch

from t2i.config import DataConfig
from t2i.data import build_loader, shards
from t2i.data.read_ahead import read_ahead
from helpers import write_image_shards


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_the_items_and_an_error_come_in_order():
    assert list(read_ahead(iter(range(100)), 7)) == list(range(100))

    def failing():
        yield from range(3)
        raise OSError("connection reset")

    got = []
    with pytest.raises(OSError, match="connection reset"):
        for item in read_ahead(failing(), 2):
            got.append(item)
    assert got == [0, 1, 2]


def test_it_reads_ahead_unasked_and_stops_when_closed():
    produced, closed = [], threading.Event()

    def source():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    ahead = read_ahead(source(), 5)
    assert next(ahead) == 0
    # with item 0 taken and nothing more asked, the thread fills the 5 places and holds one
    assert wait_until(lambda: len(produced) == 7)
    ahead.close()
    assert wait_until(closed.is_set)  # the source closed (its files with it) in the thread
    assert len(produced) == 7
    assert wait_until(lambda: not any(t.name == "t2i-read-ahead" and t.is_alive()
                                      for t in threading.enumerate()))


def test_a_remote_source_gives_the_batches_of_the_same_shards_read_locally(tmp_path,
                                                                            monkeypatch):
    local = write_image_shards(tmp_path / "d", shards=3, per_shard=7)

    def fake_open(url: str):  # https://data.example/NAME -> the local shard NAME
        if "://" not in url:
            return open(url, "rb")
        return io.BytesIO((local / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(shards, "open_shard", fake_open)
    remote = ",".join(f"https://data.example/data_00000{i}.tar" for i in range(3))

    def keys(source: str) -> list[list[str]]:
        cfg = DataConfig(source=source, resolution=16, shuffle_buffer=4, workers=2)
        loader = build_loader(cfg, batch_size=3, seed=1, in_process=True,
                              tokenize=lambda p: torch.zeros(len(p), 77, dtype=torch.long))
        return [b["key"] for b, _ in zip(loader, range(12))]  # 36 of 21 samples: 2 passes

    assert keys(remote) == keys(",".join(str(local / f"data_00000{i}.tar") for i in range(3)))


def test_the_remote_read_bench_case_times_both_ways_in_one_run():
    from bench.cases.remote import remote_read_case
    from bench.core import BenchContext

    rows = remote_read_case(BenchContext(device="cpu", quick=True))
    assert [r["name"] for r in rows] == ["read in turn, 2 ms/64 KiB", "read ahead, 2 ms/64 KiB"]
    assert all(r["samples"] == 32 and r["samples_per_sec"] > 0 for r in rows)
    assert rows[1]["ratio_vs"] == rows[0]["name"] and "ratio" in rows[1]
    assert shards.open_shard.__name__ == "open_shard"  # the stand-in is gone afterwards
