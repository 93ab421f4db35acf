"""The shard pipeline on small shards generated here in the text-to-image-2M layout: bad samples
of every kind, determinism, rank/worker coverage and exact resume."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.config import DataConfig
from t2i.data import DataError, build_loader
from t2i.data.pack import ShardWriter, jpeg_bytes, sample_json


def fake_tokenize(prompts: list[str]) -> torch.Tensor:
    """A stand-in for the CLIP tokenizer: (B, 77) int64, word lengths then zeros."""
    out = torch.zeros(len(prompts), 77, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = [len(w) for w in prompt.split()][:77]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)


def write_clean_shards(folder: Path, shards: int, per_shard: int, size: int = 40) -> list[str]:
    """`shards` x `per_shard` good samples with globally unique keys; returns all keys."""
    keys = []
    with ShardWriter(folder, per_shard) as writer:
        for i in range(shards * per_shard):
            key = f"s{i // per_shard:02d}k{i % per_shard:03d}"
            writer.write(key, {"jpg": jpeg_bytes(gradient(size, size, i), 90),
                               "json": sample_json(f"picture number {i}", width=size)})
            keys.append(key)
    return keys


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# The messy set: (key, files, expected outcome) where outcome is "ok", "ok:<converted mode>" or
# a bad kind.
def messy_samples() -> list[tuple[str, dict[str, bytes], str]]:
    good = sample_json("a fine picture", source="test", score=0.5)
    jpeg = encode(gradient(300, 200), "JPEG", quality=90)
    cmyk = encode(gradient(120, 90).convert("CMYK"), "JPEG")
    rgba = gradient(64, 64).convert("RGBA")
    rgba.putalpha(128)
    palette = gradient(50, 70).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16))
    return [
        ("a00", {"jpg": jpeg, "json": good}, "ok"),
        ("a01", {"jpg": encode(gradient(512, 512), "JPEG"), "json": good}, "ok"),
        ("a02", {"png": encode(gradient(96, 128), "PNG"), "json": good}, "ok"),
        ("a03", {"jpg": encode(gradient(80, 60).convert("L"), "JPEG"), "json": good}, "ok:L"),
        ("a04", {"jpg": cmyk, "json": good}, "ok:CMYK"),
        ("a05", {"png": encode(rgba, "PNG"), "json": good}, "ok:RGBA"),
        ("a06", {"png": encode(palette, "PNG"), "json": good}, "ok:P"),
        ("a07", {"png": encode(sixteen, "PNG"), "json": good}, "ok:I;16"),
        ("a08", {"jpg": jpeg, "txt": b"caption from a txt file"}, "ok"),
        ("b00", {"jpg": jpeg[: len(jpeg) // 2], "json": good}, "corrupt_image"),
        ("b01", {"jpg": b"this is not an image at all", "json": good}, "corrupt_image"),
        ("b02", {"jpg": jpeg, "json": b'{"prompt": "unterminated'}, "bad_json"),
        ("b03", {"jpg": jpeg, "json": b"[1, 2, 3]"}, "bad_json"),
        ("b04", {"jpg": jpeg, "json": b'{"caption": "wrong key"}'}, "no_prompt"),
        ("b05", {"jpg": jpeg, "json": b'{"prompt": "   "}'}, "empty_prompt"),
        ("b06", {"jpg": jpeg}, "no_caption"),
        ("b07", {"json": good}, "no_image"),
        ("b08", {"jpg": encode(gradient(4, 4), "JPEG"), "json": good}, "too_small"),
        ("b09", {"jpg": encode(gradient(400, 50), "JPEG"), "json": good}, "bad_aspect"),
        ("a09", {"jpg": jpeg, "json": good}, "ok"),
    ]


def write_messy_shards(folder: Path) -> list[tuple[str, dict[str, bytes], str]]:
    """The messy samples alternately into two shards, each led by a sample without JSON (the
    stock loader would fail to infer its columns)."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = messy_samples()
    for shard in range(2):
        with tarfile.open(folder / f"data_{shard:06d}.tar", "w") as tar:
            for key, files, _ in sorted(samples[shard::2], key=lambda s: s[2] != "no_caption"):
                for ext, data in files.items():
                    add(tar, f"{key}.{ext}", data)
    return samples


def cfg_for(path: Path, **kw) -> DataConfig:
    base = dict(source=str(path), resolution=32, shuffle_buffer=4, workers=0,
                max_bad_fraction=1.0)
    return DataConfig(**{**base, **kw})


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def keys_of(batches: list[dict]) -> list[str]:
    return [k for b in batches for k in b["key"]]


# ----------------------------------------------------------------------------------------------


def test_messy_shards_skip_count_log_and_convert(tmp_path, caplog):
    samples = write_messy_shards(tmp_path / "messy")
    good = [key for key, _, outcome in samples if outcome.startswith("ok")]
    loader = build_loader(cfg_for(tmp_path / "messy"), batch_size=len(good),
                          tokenize=fake_tokenize, seed=0)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        batch, second = take(loader, 2)  # two epochs: every bad sample met at least once
    assert sorted(batch["key"]) == sorted(good) and sorted(second["key"]) == sorted(good)
    image = batch["image"]
    assert image.shape == (len(good), 3, 32, 32) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.std() > 0.05
    assert batch["tokens"].shape == (len(good), 77) and batch["tokens"].dtype == torch.int64
    prompts = dict(zip(batch["key"], batch["prompt"]))
    assert prompts["a08"] == "caption from a txt file" and prompts["a00"] == "a fine picture"

    logged = {}
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("skipped bad sample"):
            fields = dict(part.split("=", 1) for part in message.split()[3:6])
            assert fields["shard"].endswith((".../data_000000.tar"[-15:], "data_000001.tar"))
            logged.setdefault(fields["key"], set()).add(fields["kind"])
    expected = {key: {outcome} for key, _, outcome in samples if not outcome.startswith("ok")}
    assert logged == expected
    stats = loader.stats()
    assert stats["good"] == 2 * len(good)
    assert stats["bad"] == sum(1 for r in caplog.records if "skipped bad" in r.getMessage())
    for kind in {o for v in expected.values() for o in v}:
        n = sum(1 for v in expected.values() if kind in v)
        assert n <= stats["bad_by_kind"][kind] <= 2 * n
    assert set(stats["bad_by_kind"]) == {o for v in expected.values() for o in v}
    assert stats["converted"] == {"CMYK": 2, "I;16": 2, "L": 2, "P": 2, "RGBA": 2}


def test_stock_datasets_iterator_dies_where_ours_continues(tmp_path):
    """Why we read undecoded: the plain loader stops the whole stream on one bad JSON."""
    import datasets

    write_messy_shards(tmp_path / "messy")
    files = sorted(str(p) for p in (tmp_path / "messy").glob("*.tar"))
    with pytest.raises(Exception):
        ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                   streaming=True)
        for _ in ds:
            pass


def test_bad_fraction_stops_with_clear_error(tmp_path):
    write_messy_shards(tmp_path / "messy")
    cfg = cfg_for(tmp_path / "messy", max_bad_fraction=0.2, bad_check_after=10)
    loader = build_loader(cfg, batch_size=2, tokenize=fake_tokenize, seed=0)
    with pytest.raises(DataError, match=r"samples were bad .*max_bad_fraction 0.2") as err:
        take(loader, 20)
    assert "messy" in str(err.value) and "\n" not in str(err.value)


def test_same_seed_same_batches_other_seed_other_order(tmp_path):
    write_clean_shards(tmp_path / "d", shards=4, per_shard=6)
    cfg = cfg_for(tmp_path / "d", crop="random", hflip=True)
    run = lambda seed: take(build_loader(cfg, batch_size=5, tokenize=fake_tokenize, seed=seed), 6)
    first, again, other = run(3), run(3), run(4)
    for a, b in zip(first, again):
        assert a["key"] == b["key"] and a["prompt"] == b["prompt"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["tokens"], b["tokens"])
    assert keys_of(first) != keys_of(other)
    # 24 samples, batch 5: the 6 batches span two epochs, each epoch a permutation of all
    assert sorted(keys_of(first)[:24]) == sorted(set(keys_of(first)))


def test_two_ranks_two_workers_disjoint_and_complete(tmp_path):
    keys = write_clean_shards(tmp_path / "d", shards=8, per_shard=5)
    cfg = cfg_for(tmp_path / "d", workers=2)
    seen = []
    for rank in range(2):
        # a rank's epoch: 4 shards x 5 samples = 20 = 4 batches of 5, alternating workers
        loader = build_loader(cfg, batch_size=5, tokenize=fake_tokenize, seed=1, rank=rank,
                              world_size=2)
        got = keys_of(take(loader, 4))
        assert len(got) == len(set(got)) == 20
        assert {s["epoch"] for s in loader.position()["stream_states"]} == {0}
        seen.append(set(got))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(keys)


def test_workers_give_the_same_batches_as_in_process_streams(tmp_path):
    write_clean_shards(tmp_path / "d", shards=4, per_shard=7)
    cfg = cfg_for(tmp_path / "d", workers=2, shuffle_buffer=5)
    real = take(build_loader(cfg, batch_size=4, tokenize=fake_tokenize, seed=2), 9)
    emulated = take(build_loader(cfg, batch_size=4, tokenize=fake_tokenize, seed=2,
                                 in_process=True), 9)
    assert keys_of(real) == keys_of(emulated)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(real, emulated))


@pytest.mark.parametrize("in_process", [True, False])
def test_resume_gives_exactly_the_remaining_batches(tmp_path, in_process):
    write_clean_shards(tmp_path / "d", shards=4, per_shard=9)
    cfg = cfg_for(tmp_path / "d", workers=2, shuffle_buffer=4, crop="random", hflip=True)
    make = lambda position=None: build_loader(cfg, batch_size=4, tokenize=fake_tokenize, seed=5,
                                              position=position, in_process=in_process)
    full = take(make(), 14)  # 56 samples: crosses windows, shards and an epoch boundary
    for cut in (3, 8):
        loader = make()
        it = iter(loader)
        for _ in range(cut):
            next(it)
        saved = json.loads(json.dumps(loader.position()))
        rest = take(make(saved), 14 - cut)
        assert keys_of(rest) == keys_of(full[cut:])
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(rest, full[cut:]))
        assert saved["batches"] == cut and saved["stats"]["good"] == 4 * cut


def test_resume_rejects_a_position_from_other_data(tmp_path):
    write_clean_shards(tmp_path / "d", shards=2, per_shard=3)
    loader = build_loader(cfg_for(tmp_path / "d"), batch_size=2, tokenize=fake_tokenize, seed=0)
    saved = loader.position()
    with pytest.raises(DataError, match="saved with seed=0, now seed=1"):
        build_loader(cfg_for(tmp_path / "d"), batch_size=2, tokenize=fake_tokenize, seed=1,
                     position=saved)


@pytest.mark.parametrize("make_source, message", [
    (lambda p: str(p / "missing"), "does not exist"),
    (lambda p: str(p), "holds no .tar shards"),
    (lambda p: str(p / "*.tar"), "matches no files"),
])
def test_wrong_path_or_empty_folder_is_one_line_data_error(tmp_path, make_source, message):
    source = make_source(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        build_loader(cfg_for(source), batch_size=2, tokenize=fake_tokenize, seed=0)
    assert source in str(err.value) and "\n" not in str(err.value)


def test_hub_source_offline_names_the_source(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hf://jackyhate/text-to-image-2M", subset="1024")
    with pytest.raises(DataError, match=r"hf://jackyhate/text-to-image-2M/data_1024_10K.*HF_HUB_OFFLINE"):
        build_loader(cfg, batch_size=2, tokenize=fake_tokenize, seed=0)


def test_more_ranks_than_shards_is_an_error(tmp_path):
    write_clean_shards(tmp_path / "d", shards=1, per_shard=3)
    with pytest.raises(DataError, match="1 shard"):
        build_loader(cfg_for(tmp_path / "d"), batch_size=2, tokenize=fake_tokenize, seed=0,
                     rank=1, world_size=2)


def test_truncated_shard_is_reported_and_reading_goes_on(tmp_path, caplog):
    keys = write_clean_shards(tmp_path / "d", shards=2, per_shard=6)
    shard = tmp_path / "d" / "data_000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])  # cut mid-block, inside the 2nd sample
    loader = build_loader(cfg_for(tmp_path / "d"), batch_size=6, tokenize=fake_tokenize, seed=0)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        batch = next(iter(loader))
    assert set(batch["key"]) <= set(keys) and {k for k in batch["key"] if k.startswith("s01")}
    assert loader.stats()["shard_errors"] >= 1
    assert any("data_000000.tar stopped reading" in r.getMessage() for r in caplog.records)
