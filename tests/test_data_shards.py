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
from helpers import encode


def fake_tokenize(prompts: list[str]) -> torch.Tensor:
    """A stand-in for the CLIP tokenizer: (B, 77) int64, word lengths then zeros."""
    out = torch.zeros(len(prompts), 77, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = [len(w) for w in prompt.split()][:77]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


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
    lines = sum(1 for r in caplog.records if "skipped bad" in r.getMessage())
    assert lines == len(expected) < stats["bad"]  # counted at every pass, logged once a run
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
    with pytest.raises(DataError, match="saved with another train.seed; drop --seed"):
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
    assert loader.stats()["shard_errors"] == 1
    assert any("data_000000.tar stopped reading" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------
# Extensions in any case


def test_upper_case_extensions_are_read_like_lower_case(tmp_path):
    jpeg = encode(gradient(40, 40), "JPEG", quality=90)
    png = encode(gradient(40, 40, 1), "PNG")
    folder = tmp_path / "d"
    folder.mkdir()
    with tarfile.open(folder / "DATA_000000.TAR", "w") as tar:
        for key, files in [("k0", {"JPG": jpeg, "JSON": sample_json("upper jpg")}),
                           ("k1", {"Png": png, "Txt": b"mixed case png"}),
                           ("k2", {"JPEG": jpeg, "json": sample_json("upper jpeg")}),
                           ("k3", {"jpg": jpeg, "JPG": jpeg, "json": sample_json("twice")})]:
            for ext, data in files.items():
                add(tar, f"{key}.{ext}", data)
    loader = build_loader(cfg_for(folder, shuffle_buffer=1), batch_size=3,
                          tokenize=fake_tokenize, seed=0)
    first, second = take(loader, 2)  # in file order: k3 is met between the two batches
    assert list(zip(first["key"], first["prompt"])) == [
        ("k0", "upper jpg"), ("k1", "mixed case png"), ("k2", "upper jpeg")]
    assert second["key"] == first["key"]
    assert loader.stats()["bad_by_kind"] == {"duplicate_file": 1}  # KEY.jpg and KEY.JPG


# ----------------------------------------------------------------------------------------------
# Every early end of a shard is reported


def member_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar.getmembers()]


def cut_points(path: Path) -> dict[str, int]:
    """Byte lengths that cut a 50-sample shard after 25 whole samples, in four ways."""
    members = member_offsets(path)
    header = members[50][1]  # first file (KEY.jpg) of sample 25
    return {"in_header": header + 100, "in_data": members[50][2] + 10,
            "at_member_boundary": header, "garbage_header": -header}


@pytest.mark.parametrize("how", ["in_header", "in_data", "at_member_boundary", "garbage_header"])
def test_every_early_end_of_a_shard_is_reported_once_and_counted(tmp_path, how, caplog):
    keys = write_clean_shards(tmp_path / "d", shards=2, per_shard=50, size=16)
    shard = tmp_path / "d" / "data_000000.tar"
    data, cut = shard.read_bytes(), cut_points(shard)[how]
    if cut > 0:
        shard.write_bytes(data[:cut])
    else:  # a damaged header block: tarfile alone ends the shard there in silence
        shard.write_bytes(data[:-cut] + b"\x07" * 512 + data[-cut + 512:])
    loader = build_loader(cfg_for(tmp_path / "d", resolution=16), batch_size=74,
                          tokenize=fake_tokenize, seed=0)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        batch = next(iter(loader))  # exactly one epoch: 24 + 50 samples
    # the 25th sample is dropped too: the cut may have taken its later files
    assert sorted(batch["key"]) == sorted(keys[:24] + keys[50:])
    assert loader.stats()["shard_errors"] == 1 and loader.stats()["bad"] == 0
    warnings = [r.getMessage() for r in caplog.records if "stopped reading" in r.getMessage()]
    assert len(warnings) == 1 and "data_000000.tar stopped reading after sample 24" in warnings[0]


def test_inspect_reports_a_shard_cut_inside_a_header(tmp_path):
    from t2i.data.inspect import inspect_source

    write_clean_shards(tmp_path / "d", shards=2, per_shard=50, size=16)
    shard = tmp_path / "d" / "data_000000.tar"
    shard.write_bytes(shard.read_bytes()[:cut_points(shard)["in_header"]])
    info = inspect_source(str(tmp_path / "d"), resolution=16).as_dict()
    assert info["scanned"] == 74 and info["good"] == 74
    assert len(info["shard_errors"]) == 1 and "after sample 24" in info["shard_errors"][0]


def test_a_complete_shard_reads_whole_and_reports_nothing(tmp_path):
    keys = write_clean_shards(tmp_path / "d", shards=1, per_shard=50, size=16)
    loader = build_loader(cfg_for(tmp_path / "d", resolution=16), batch_size=50,
                          tokenize=fake_tokenize, seed=0)
    assert sorted(next(iter(loader))["key"]) == sorted(keys)
    assert loader.stats()["shard_errors"] == 0


# ----------------------------------------------------------------------------------------------
# Empty shards


def write_empty_shard(path: Path, members: dict[str, bytes] | None = None) -> None:
    """A tar with no sample: no member at all, or only members that are no sample files."""
    with tarfile.open(path, "w") as tar:
        for name, data in (members or {}).items():
            add(tar, name, data)


def test_empty_shard_is_skipped_on_every_rank_before_training(tmp_path, caplog):
    """Shards of 16, 16 and 0 samples on 2 ranks: before, the first epoch in which rank 1
    drew only the empty shard raised DataError there (seed 4: at its 4th batch)."""
    keys = write_clean_shards(tmp_path / "d", shards=2, per_shard=16, size=16)
    write_empty_shard(tmp_path / "d" / "data_000002.tar")
    cfg = cfg_for(tmp_path / "d", resolution=16)
    seen = []
    for rank in range(2):
        with caplog.at_level(logging.WARNING, logger="t2i.data"):
            loader = build_loader(cfg, batch_size=8, tokenize=fake_tokenize, seed=4, rank=rank,
                                  world_size=2)
            got = keys_of(take(loader, 12))  # 6 epochs of this rank's one 16-sample shard
        assert loader.position()["num_shards"] == 2
        assert loader.stats()["empty_shards"] == ["data_000002.tar"]
        seen.append([set(got[e * 16:(e + 1) * 16]) for e in range(6)])  # one shard an epoch
    shard_keys = [set(keys[:16]), set(keys[16:])]
    for epoch in range(6):  # in every epoch the ranks read the two shards, one each
        assert sorted([seen[0][epoch], seen[1][epoch]], key=min) == shard_keys
    skips = [r.getMessage() for r in caplog.records if "empty shard" in r.getMessage()]
    assert len(skips) == 2 and all("skipping 1 empty shard(s): data_000002.tar" in m
                                   for m in skips)  # once per rank, at start


def test_shard_without_samples_found_while_reading_is_skipped_and_logged_once(tmp_path, caplog):
    """A shard that only streaming shows empty (here: hidden files only; remotely: any empty
    tar) ends an epoch of its rank without a sample, and the rank simply goes on."""
    keys = write_clean_shards(tmp_path / "d", shards=2, per_shard=4, size=16)
    write_empty_shard(tmp_path / "d" / "data_000002.tar", {".hidden.jpg": b"x", "__meta": b"y"})
    cfg = cfg_for(tmp_path / "d", resolution=16)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        loader = build_loader(cfg, batch_size=4, tokenize=fake_tokenize, seed=4, rank=1,
                              world_size=2)
        got = keys_of(take(loader, 10))
    assert set(got) <= set(keys) and len(got) == 40
    epochs = loader.position()["stream_states"][0]["epoch"]
    assert epochs > 10  # some epochs gave nothing: the empty shard was drawn, and skipped
    assert loader.stats()["empty_shards"] == ["data_000002.tar"]
    skips = [r for r in caplog.records if "skipping empty shard" in r.getMessage()]
    assert len(skips) == 1


def test_only_empty_shards_is_one_line_data_error_before_training(tmp_path):
    (tmp_path / "d").mkdir()
    write_empty_shard(tmp_path / "d" / "data_000000.tar")
    (tmp_path / "d" / "data_000001.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"no usable sample: all 2 shard\(s\) are empty"):
        build_loader(cfg_for(tmp_path / "d"), batch_size=2, tokenize=fake_tokenize, seed=0)


@pytest.mark.parametrize("rank", [0, 1])
def test_source_without_a_usable_sample_stops_every_rank_instead_of_spinning(tmp_path, rank):
    folder = tmp_path / "d"
    with ShardWriter(folder, 3) as writer:
        for i in range(9):
            writer.write(f"k{i}", {"jpg": b"not a jpeg", "json": sample_json("broken")})
    loader = build_loader(cfg_for(folder, max_bad_fraction=1.0), batch_size=2,
                          tokenize=fake_tokenize, seed=0, rank=rank, world_size=2)
    with pytest.raises(DataError, match=r"no usable sample: every one of its 3 shard") as err:
        next(iter(loader))
    assert "corrupt_image" in str(err.value) and "\n" not in str(err.value)
    assert "next to each other" not in str(err.value)


def write_images_then_captions(path: Path, count: int) -> None:
    """A tar made as `tar cf x.tar *.jpg *.json`: every image, then every caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for ext in ("jpg", "json"):
            for i in range(count):
                add(tar, f"k{i:02d}.{ext}", jpeg_bytes(gradient(16, 16, i), 90) if ext == "jpg"
                    else sample_json(f"picture {i}"))


def test_a_tar_whose_sample_files_are_apart_is_refused_with_the_reason(tmp_path):
    write_images_then_captions(tmp_path / "d" / "data_000000.tar", 3)
    loader = build_loader(cfg_for(tmp_path / "d", resolution=16), batch_size=2,
                          tokenize=fake_tokenize, seed=0)
    with pytest.raises(DataError, match=r"gave only no_caption 3, no_image 3; a sample's files "
                                        r"\(KEY.jpg, KEY.json\) must be next to each other in "
                                        r"the tar: make it with GNU `tar --sort=name") as err:
        next(iter(loader))
    assert "t2i-data pack" in str(err.value) and "\n" not in str(err.value)


def test_too_many_bad_samples_from_split_files_stop_with_the_reason(tmp_path):
    """One good shard beside one whose files are apart: the bad share stops the run (not the
    'no usable sample' error), and that message gives the reason too."""
    write_clean_shards(tmp_path / "d", shards=1, per_shard=4, size=16)
    write_images_then_captions(tmp_path / "d" / "data_000009.tar", 4)
    loader = build_loader(cfg_for(tmp_path / "d", resolution=16, max_bad_fraction=0.1,
                                  bad_check_after=1), batch_size=4, tokenize=fake_tokenize,
                          seed=0)
    with pytest.raises(DataError, match=r"samples were bad .*no_caption 4, no_image 4\); a "
                                        r"sample's files \(KEY.jpg, KEY.json\) must be next"):
        take(loader, 3)


def test_remote_shards_stream_with_the_same_reader_and_checks(tmp_path):
    """A URL goes through `datasets`' xopen (here fsspec's memory://, no network): the same
    samples, a cut reported, an empty tar reported as empty."""
    import fsspec

    from t2i.data.shards import ShardIssue, read_shard

    keys = write_clean_shards(tmp_path / "d", shards=1, per_shard=5, size=16)
    data = (tmp_path / "d" / "data_000000.tar").read_bytes()
    write_empty_shard(tmp_path / "empty.tar")
    fs = fsspec.filesystem("memory")
    fs.pipe("/t2i-test/whole.tar", data)
    fs.pipe("/t2i-test/cut.tar", data[:cut_points_of(data, 3)])
    fs.pipe("/t2i-test/empty.tar", (tmp_path / "empty.tar").read_bytes())
    whole = list(read_shard("memory://t2i-test/whole.tar", start=1))
    assert [item[0] for item in whole] == [1, 2, 3, 4]
    assert [item[1]["__key__"] for item in whole] == keys[1:]
    cut = list(read_shard("memory://t2i-test/cut.tar"))
    assert len(cut) == 3 and cut[-1].kind == "shard_error" and cut[-1].offset == 2
    assert list(read_shard("memory://t2i-test/empty.tar")) == [
        ShardIssue("empty_shard", "memory://t2i-test/empty.tar", 0, "the shard holds no sample")]
    fs.rm("/t2i-test", recursive=True)


def cut_points_of(data: bytes, sample: int) -> int:
    """A length that cuts `data` (a tar of 2-file samples) inside the header of `sample`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()[2 * sample].offset + 100


def test_a_source_that_stops_mid_run_is_retried_then_refused_not_spun_on(tmp_path, monkeypatch):
    import t2i.data.stream as stream

    write_clean_shards(tmp_path / "d", shards=2, per_shard=4)
    waits: list[float] = []
    monkeypatch.setattr(stream, "RETRY_DELAYS_S", (1.0, 2.0))
    monkeypatch.setattr(stream.time, "sleep", waits.append)
    loader = build_loader(cfg_for(tmp_path / "d", shuffle_buffer=2), batch_size=2,
                          tokenize=fake_tokenize, seed=0, in_process=True)
    batches = iter(loader)
    next(batches)
    for shard in (tmp_path / "d").glob("*.tar"):
        shard.unlink()  # an outage: every shard fails from now on
    with pytest.raises(DataError, match="stopped giving usable samples: 3 passes in a row"):
        for _ in range(10):
            next(batches)
    assert waits == [1.0, 2.0]  # a wait after each failed pass, then the error


def test_a_deeply_nested_json_is_a_bad_sample_not_a_dead_run(tmp_path, caplog):
    folder = tmp_path / "d"
    nested = ("[" * 100_000 + "]" * 100_000).encode()  # json.loads: RecursionError
    with ShardWriter(folder, 4) as writer:
        for i in range(4):
            writer.write(f"k{i}", {"jpg": jpeg_bytes(gradient(40, 40, i), 95),
                                   "json": nested if i == 1 else sample_json(f"picture {i}")})
    loader = build_loader(cfg_for(folder, max_bad_fraction=1.0), batch_size=3,
                          tokenize=fake_tokenize, seed=0, in_process=True)
    batches = iter(loader)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        first, second = next(batches), next(batches)  # two passes over the one shard
    assert sorted(first["key"]) == sorted(second["key"]) == ["k0", "k2", "k3"]
    assert loader.stats()["bad_by_kind"] == {"bad_json": 2}  # met once per pass
    assert any("key=k1 kind=bad_json" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("shards, workers, warned", [(3, 2, True), (4, 2, False)])
def test_shards_that_do_not_split_evenly_over_the_streams_are_warned_about(tmp_path, caplog,
                                                                           shards, workers,
                                                                           warned):
    write_clean_shards(tmp_path / "d", shards=shards, per_shard=2)
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        build_loader(cfg_for(tmp_path / "d", workers=workers), batch_size=2,
                     tokenize=fake_tokenize, seed=0)
    lines = [r.getMessage() for r in caplog.records if "stream(s)" in r.getMessage()]
    assert lines == ([f"{shards} shards over 1 rank(s) x 2 stream(s): each stream reads 1 or 2 "
                      f"of them per pass, so samples are not seen exactly once per pass of the "
                      f"data (over many passes it evens out); a shard count that is a multiple "
                      f"of 2 (data.workers and the process count decide it) avoids that, and "
                      f"so do latent shards (t2i-data encode), which are split by samples"]
                     if warned else [])


def test_uneven_streams_read_every_shard_equally_often_over_many_passes():
    """5 shards over 2 ranks x 2 streams (2, 1, 1, 1 shards a pass): streams read at one rate,
    so the one with 2 shards makes half as many passes; the per-pass reshuffle evens the
    shards' read counts out (a fixed deal would read 4 of them twice as often as the fifth)."""
    from collections import Counter

    from t2i.data.stream import StreamPlan

    urls = tuple(f"s{i}.tar" for i in range(5))
    reads: Counter = Counter()
    for rank in range(2):
        for stream in range(2):
            plan = StreamPlan(urls, seed=3, rank=rank, world_size=2, streams=2, stream=stream)
            done, epoch = 0, 0
            while done < 4000:  # shard reads per stream
                for url in plan.shards(epoch)[:4000 - done]:
                    reads[url] += 1
                    done += 1
                epoch += 1
    mean = sum(reads.values()) / 5
    assert max(abs(n - mean) / mean for n in reads.values()) < 0.03


def test_the_ranks_data_counts_merge_into_one_report():
    from t2i.data.loader import merged_stats

    ranks = [{"samples": 10, "good": 8, "bad": 2, "bad_fraction": 0.2,
              "bad_by_kind": {"corrupt_image": 2}, "converted": {"L": 1}, "shard_errors": 0,
              "empty_shards": ["b.tar"]},
             {"samples": 30, "good": 27, "bad": 3, "bad_fraction": 0.1,
              "bad_by_kind": {"corrupt_image": 1, "no_caption": 2}, "converted": {},
              "shard_errors": 1, "empty_shards": ["a.tar", "b.tar"]}]
    assert merged_stats(ranks) == {
        "samples": 40, "good": 35, "bad": 5, "shard_errors": 1, "bad_fraction": 5 / 40,
        "bad_by_kind": {"corrupt_image": 3, "no_caption": 2}, "converted": {"L": 1},
        "empty_shards": ["a.tar", "b.tar"]}
    assert merged_stats([ranks[0]]) == {**ranks[0]}
