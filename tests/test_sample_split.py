"""Latent shards are split between ranks and streams by samples, not whole shards (stream.py's
StreamPlan with counts): every reader reads N / R samples a pass, so each sample comes round
exactly once a pass however the shard count divides, and a position inside a segment resumes
exactly. Before, 3 shards over 2 ranks gave rank 1 one shard and rank 0 two, and rank 1 read
its shard twice while rank 0 read its two once."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from t2i.config import DataConfig
from t2i.data import build_loader
from t2i.data.stream import Segment, StreamPlan, sample_range
from helpers import micro_cfg, save_random_vae, write_image_shards, write_latent_shards


def zero_tokens(prompts: list[str]) -> torch.Tensor:
    return torch.zeros(len(prompts), 77, dtype=torch.long)


def expand(segments: list[Segment], counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(s.url, i) for s in segments
            for i in range(s.start, counts[s.url] if s.stop is None else s.stop)]


def test_sample_range_cuts_shards_laid_end_to_end():
    shards = [("a", 4), ("b", 3), ("c", 5)]
    assert sample_range(shards, 0, 12) == [Segment("a"), Segment("b"), Segment("c")]
    assert sample_range(shards, 2, 9) == [Segment("a", 2), Segment("b"), Segment("c", 0, 2)]
    assert sample_range(shards, 5, 6) == [Segment("b", 1, 2)]
    assert sample_range(shards, 4, 7) == [Segment("b")]
    assert sample_range(shards, 7, 7) == []


@pytest.mark.parametrize("world_size,streams", [(1, 3), (2, 2), (3, 4), (8, 4)])
def test_the_readers_partition_every_pass_into_equal_shares(world_size, streams):
    rng = np.random.default_rng(world_size * 10 + streams)
    counts = tuple(int(n) for n in rng.integers(1, 40, size=7))  # 7 shards, uneven sizes
    urls = tuple(f"s{i}.tar" for i in range(7))
    by_url = dict(zip(urls, counts))
    for epoch in range(3):
        shares = [expand(StreamPlan(urls, 11, r, world_size, streams, s, counts).segments(epoch),
                         by_url) for r in range(world_size) for s in range(streams)]
        read = [sample for share in shares for sample in share]
        assert sorted(read) == sorted((u, i) for u in urls for i in range(by_url[u]))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    # the shard order still changes from pass to pass
    plan = StreamPlan(urls, 11, 0, world_size, streams, 0, counts)
    assert [plan.segments(e) for e in range(4)] != [plan.segments(0)] * 4


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> dict:
    """3 latent shards of 7 samples: 3 shards split over 4 readers (or 2) unevenly."""
    root = tmp_path_factory.mktemp("sample-split")
    images = write_image_shards(root / "images", shards=3, per_shard=7)
    cfg = micro_cfg(f"data.source={images}")
    latents = write_latent_shards(images, root / "latents", cfg,
                                  save_random_vae(cfg, root / "vae.safetensors"))
    return {"latents": latents, "keys": {(f"data_{i // 7:06d}.tar", f"{i:09d}")
                                         for i in range(21)}}


def make(source: Path, *, position=None, batch_size=1, workers=2, in_process=True, **kw):
    cfg = DataConfig(source=str(source), resolution=16, shuffle_buffer=3, workers=workers)
    return build_loader(cfg, batch_size=batch_size, tokenize=zero_tokens, seed=5,
                        position=position, in_process=in_process, **kw)


def keys(batches: list[dict]) -> list[tuple[str, str]]:
    return [(Path(s).name, k) for b in batches for s, k in zip(b["shard"], b["key"])]


def take(loader, n: int) -> list[dict]:
    return [b for b, _ in zip(loader, range(n))]


def test_each_sample_comes_round_once_a_pass_over_ranks_and_streams(uneven):
    """21 samples over 2 ranks x 2 streams: shares of 5, 5, 5 and 6. The first 10 batches of
    each rank (5 from each stream) are 20 distinct samples; with whole shards rank 1 (one shard
    of 7, one stream) would have read 3 of them twice."""
    read = [keys(take(make(uneven["latents"], rank=r, world_size=2), 10)) for r in range(2)]
    assert len(set(read[0] + read[1])) == 20
    assert set(read[0] + read[1]) <= uneven["keys"]
    # and a worker per stream reads what the in-process streams read
    assert keys(take(make(uneven["latents"], rank=1, world_size=2, in_process=False), 10)) \
        == read[1]


def test_latent_shards_that_do_not_divide_are_not_warned_about_and_feed_more_streams(
        uneven, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        loader = make(uneven["latents"], workers=5)  # 5 streams over 3 shards
    assert loader.identity["streams"] == 5
    assert not [r for r in caplog.records if "stream(s)" in r.getMessage()]
    assert len(set(keys(take(loader, 20)))) == 20  # shares of 4 and 5: none read twice yet


def test_a_position_inside_a_segment_resumes_exactly(uneven):
    """1 rank x 2 streams: stream 0 reads shard A and 3 samples of shard B, stream 1 the other
    4 of B and shard C; batches of 2 over 2 passes; resume after every batch."""
    full = take(make(uneven["latents"], batch_size=2), 14)  # 28 samples: into the next pass
    # shares of 10 and 11: batches 0-9 are 20 distinct samples, batch 11 brings the 21st
    assert len(set(keys(full[:10]))) == 20 and set(keys(full[:12])) == uneven["keys"]
    for cut in range(1, 14):
        loader = make(uneven["latents"], batch_size=2)
        for _ in zip(range(cut), loader):  # range first: zip pulls no batch past `cut`
            pass
        saved = json.loads(json.dumps(loader.position()))
        assert saved["split"] == "samples"
        rest = take(make(uneven["latents"], position=saved, batch_size=2), 14 - cut)
        assert keys(rest) == keys(full[cut:]), cut
        assert all(torch.equal(a["moments"], b["moments"]) for a, b in zip(rest, full[cut:]))


def test_a_position_saved_before_the_sample_split_resumes_with_whole_shards(uneven):
    """A latent-shard run saved by an older t2i (no "split" in its position, shards_digest of
    the paths alone) goes on reading whole shards, as it started: with 2 streams, stream 1's
    first pass is one whole shard of 7 (by samples it would be 4 of one shard and 3 of another
    of its 10)."""
    import hashlib

    loader = make(uneven["latents"])
    old = {k: v for k, v in loader.position().items() if k != "split"}
    old["shards_digest"] = hashlib.sha1("\n".join(loader.urls).encode()).hexdigest()[:16]
    resumed = make(uneven["latents"], position=old)
    assert resumed.counts is None and "split" not in resumed.position()
    stream_1 = keys(take(resumed, 14))[1::2]  # batches alternate between the 2 streams
    [whole] = StreamPlan(tuple(loader.urls), 5, 0, 1, 2, 1).shards(0)
    assert {s for s, _ in stream_1} == {Path(whole).name} and len(set(stream_1)) == 7
    by_samples = keys(take(make(uneven["latents"]), 14))[1::2]
    assert len({s for s, _ in by_samples}) == 2


def test_a_latent_shard_that_changed_since_encoding_is_refused(uneven, tmp_path):
    """The split trusts the manifest's sample counts: a shard holding fewer samples (cut or
    replaced) made segments past its end read nothing, silently (20 of 27 samples read)."""
    import shutil
    import tarfile

    from t2i.data import DataError

    latents = Path(shutil.copytree(uneven["latents"], tmp_path / "latents"))
    shard = latents / "data_000001.tar"
    with tarfile.open(shard) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers()][:8]  # 4 samples
    with tarfile.open(shard, "w") as tar:
        for info, data in kept:
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"data_000001.tar' is [\d,]+ bytes, .*manifest.json' "
                                        r"says [\d,]+: it changed since t2i-data encode wrote "
                                        r"it; run the t2i-data encode command that made the "
                                        r"folder again to encode it again"):
        make(latents)

    (latents / "data_000001.tar").unlink()
    with pytest.raises(DataError, match=r"data_000001.tar' is listed in .*manifest.json' but "
                                        r"missing: run the t2i-data encode command that made "
                                        r"the folder again to encode it again"):
        make(latents)
