"""A remote shard whose read stops part way (a dropped connection) is opened again from where it
stopped (shards.read_shard), so training streams, `t2i-data encode`, inspect and validation
lose no sample to a transient failure; a local shard cut short is reported at once, as before.
The "remote" shards here are local tars behind a URL, served by a stand-in for open_shard that
drops the connection after a given number of bytes."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from t2i.data import shards
from t2i.data.shards import REMOTE_RETRY_DELAYS_S, ShardIssue, read_shard
from helpers import write_image_shards

URL = "https://data.example/data_000000.tar"


class Dropped(io.RawIOBase):
    """The bytes of `data`, raising ConnectionResetError once `cut` bytes have been read."""

    def __init__(self, data: bytes, cut: int | None):
        self.data, self.pos, self.cut = data, 0, cut

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.cut is not None and self.pos >= self.cut:
            raise ConnectionResetError("connection reset by peer")
        end = len(self.data) if self.cut is None else self.cut
        n = min(len(buffer), end - self.pos, 4096)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


@pytest.fixture
def served(tmp_path, monkeypatch):
    """URL serves a local shard of 24 samples (~100 KB: tarfile reads 10 KB records); each open
    takes the next cut of `cuts` (None: the whole shard); waits are recorded, not slept."""
    folder = write_image_shards(tmp_path / "d", shards=1, per_shard=24, size=64)
    data = (folder / "data_000000.tar").read_bytes()
    state = {"cuts": [], "opens": 0, "waits": []}

    def fake_open(url: str):
        if "://" not in url:
            return open(url, "rb")
        cut = state["cuts"][state["opens"]] if state["opens"] < len(state["cuts"]) else None
        state["opens"] += 1
        return io.BufferedReader(Dropped(data, cut))

    monkeypatch.setattr(shards, "open_shard", fake_open)
    monkeypatch.setattr(shards.time, "sleep", state["waits"].append)
    state["local"] = folder / "data_000000.tar"
    state["size"] = len(data)
    return state


def offsets_and_keys(items: list) -> list[tuple[int, str]]:
    return [(o, e["__key__"]) for o, e in (i for i in items if not isinstance(i, ShardIssue))]


def test_a_dropped_connection_is_read_again_from_where_it_stopped(served, caplog):
    whole = offsets_and_keys(list(read_shard(str(served["local"]))))
    assert len(whole) == 24 and served["size"] > 60_000
    served["cuts"] = [served["size"] // 3, served["size"] // 3]  # the second read fails there too
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        items = list(read_shard(URL))
    assert offsets_and_keys(items) == whole  # every sample once, in order, nothing reported
    assert not [i for i in items if isinstance(i, ShardIssue)]
    assert served["waits"] == list(REMOTE_RETRY_DELAYS_S[:2]) and served["opens"] == 3
    assert any("data_000000.tar stopped after sample" in r.getMessage()
               and "reading it again from there" in r.getMessage() for r in caplog.records)


def test_a_read_that_gets_further_starts_the_count_again(served):
    n = len(REMOTE_RETRY_DELAYS_S)
    served["cuts"] = [served["size"] * k // (n + 3) for k in range(1, n + 3)]  # n + 2 drops
    items = list(read_shard(URL, start=2))
    assert [o for o, _ in offsets_and_keys(items)] == list(range(2, 24))
    assert served["waits"] == [REMOTE_RETRY_DELAYS_S[0]] * (n + 2)


def test_a_remote_shard_that_keeps_failing_is_reported_after_the_retries(served):
    served["cuts"] = [served["size"] // 2] * 10
    items = list(read_shard(URL))
    [issue] = [i for i in items if isinstance(i, ShardIssue)]
    assert issue.kind == "shard_error" and 0 < issue.offset == len(offsets_and_keys(items)) < 24
    assert "ConnectionResetError" in issue.detail
    assert served["waits"] == list(REMOTE_RETRY_DELAYS_S)


def test_a_local_shard_cut_short_is_reported_at_once(served, tmp_path):
    cut = tmp_path / "cut.tar"
    cut.write_bytes(served["local"].read_bytes()[:served["size"] // 2])
    items = list(read_shard(str(cut)))
    assert [i.kind for i in items if isinstance(i, ShardIssue)] == ["shard_error"]
    assert served["waits"] == []


def test_a_training_stream_loses_no_sample_to_a_dropped_connection(served):
    import torch

    from t2i.config import DataConfig
    from t2i.data.loader import ShardLoader

    served["cuts"] = [served["size"] // 2]
    cfg = DataConfig(source=URL, resolution=16, shuffle_buffer=4, workers=0)
    loader = ShardLoader(cfg, batch_size=24, tokenize=lambda p: torch.zeros(len(p), 77),
                         seed=0, rank=0, world_size=1, position=None, in_process=True)
    [batch] = [b for b, _ in zip(loader, range(1))]
    assert sorted(batch["key"]) == [f"{i:09d}" for i in range(24)]
    assert loader.stats()["shard_errors"] == 0 and served["waits"] == [REMOTE_RETRY_DELAYS_S[0]]
