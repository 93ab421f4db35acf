"""Packing a folder of captioned images into shards, exporting shapes as shards, and loading
both back through the shard pipeline; dataset inspection."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from t2i.config import DataConfig
from t2i.data import build_loader, shapes
from t2i.data.inspect import format_report, inspect_source, write_sheet
from t2i.data.pack import export_shapes, pack_folder


def fake_tokenize(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(p)] + [0] * 76 for p in prompts], dtype=torch.long)


def image(width: int, height: int, value: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(value)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def make_txt_folder(root: Path) -> dict[str, str]:
    """Images with same-name .txt captions (in a subfolder too) and a few bad entries."""
    (root / "sub").mkdir(parents=True)
    captions = {"cat.jpg": "a cat", "dog.png": "a dog on grass", "sub/bird.webp": "a bird",
                "gray.jpg": "a gray square"}
    image(80, 60, 1).save(root / "cat.jpg")
    image(64, 64, 2, "RGBA").save(root / "dog.png")
    image(70, 90, 3).save(root / "sub" / "bird.webp")
    image(50, 50, 4, "L").save(root / "gray.jpg")
    for name, text in captions.items():
        (root / name).with_suffix(".txt").write_text(text)
    image(40, 40, 5).save(root / "nocaption.jpg")
    image(40, 40, 6).save(root / "empty.jpg")
    (root / "empty.txt").write_text("  \n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "broken.txt").write_text("broken image")
    (root / "orphan.txt").write_text("no image for this caption")
    return captions


def load_all(folder: Path, count: int, resolution: int = 32) -> list[dict]:
    cfg = DataConfig(source=str(folder), resolution=resolution, shuffle_buffer=1,
                     max_bad_fraction=0.0)
    it = iter(build_loader(cfg, batch_size=1, tokenize=fake_tokenize, seed=0))
    return [next(it) for _ in range(count)]


def test_pack_txt_folder_round_trip_and_skip_report(tmp_path):
    captions = make_txt_folder(tmp_path / "src")
    report = pack_folder(tmp_path / "src", tmp_path / "out", shard_size=3)
    assert report.packed == 4 and [p.name for p in report.shards] == ["data_000000.tar",
                                                                     "data_000001.tar"]
    assert report.skipped["no caption"] == ["nocaption.jpg"]
    assert report.skipped["empty caption"] == ["empty.jpg"]
    assert report.skipped["caption without image"] == ["orphan.txt"]
    assert [n.split()[0] for n in report.skipped["unreadable image"]] == ["broken.jpg"]
    assert "packed 4 samples into 2 shard(s)" in report.summary()
    with tarfile.open(report.shards[0]) as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000.jpg", "000000000.json"]  # the text-to-image-2M layout
    batches = load_all(tmp_path / "out", 4)
    assert sorted(b["prompt"][0] for b in batches) == sorted(captions.values())
    for b in batches:
        assert b["image"].shape == (1, 3, 32, 32)


def test_pack_metadata_jsonl_keeps_jpeg_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image(100, 80, 1).save(src / "a.jpg", quality=80)
    image(60, 60, 2).save(src / "b.png")
    rows = [{"file_name": "a.jpg", "text": "first"}, {"file_name": "b.png", "text": "second"},
            {"file_name": "missing.jpg", "text": "gone"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    report = pack_folder(src, tmp_path / "out")
    assert report.packed == 2 and report.skipped["caption without image"] == ["missing.jpg"]
    assert report.skipped["unreadable metadata line"] == ["metadata.jsonl:4"]
    with tarfile.open(report.shards[0]) as tar:
        first = tar.extractfile("000000000.jpg").read()
        meta = json.loads(tar.extractfile("000000000.json").read())
        assert "000000001.jpg" in tar.getnames()  # PNG converted to JPEG
    assert first == (src / "a.jpg").read_bytes() and meta == {"prompt": "first",
                                                               "file_name": "a.jpg"}
    assert sorted(b["prompt"][0] for b in load_all(tmp_path / "out", 2)) == ["first", "second"]


def test_shapes_exported_as_shards_load_back_and_analyze_correctly(tmp_path):
    paths = export_shapes(tmp_path / "shapes", count=60, seed=1, shard_size=25)
    assert len(paths) == 3
    with tarfile.open(paths[0]) as tar:
        truth = {}
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                truth[member.name[:-5]] = json.loads(tar.extractfile(member).read())
    batches = load_all(tmp_path / "shapes", 60, resolution=64)
    checked = 0
    for b in batches:
        key = b["key"][0]
        found = shapes.analyze(b["image"][0])
        if key in truth:
            meta = truth[key]
            expected = shapes.ShapeAttrs(meta["colour"], meta["shape"], meta["position"],
                                         meta["background"])
            assert found == expected and b["prompt"][0] == meta["prompt"]
            checked += 1
        assert found.colour in b["prompt"][0] and found.shape in b["prompt"][0]
    assert checked == 25
    # byte-identical when exported again with the same seed
    again = export_shapes(tmp_path / "again", count=60, seed=1, shard_size=25)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_inspect_counts_histograms_tokens_and_sheet(tmp_path):
    export_shapes(tmp_path / "shapes", count=40, shard_size=20)
    report = inspect_source(str(tmp_path / "shapes"), resolution=64, sheet_count=6,
                            count_tokens=lambda text: len(text.split()) + 2)
    info = report.as_dict()
    assert info["complete"] and info["samples"] == 40 and info["good"] == 40
    assert info["sizes"] == {"64x64": 40} and info["modes"] == {"RGB": 40}
    assert info["prompt_tokens"]["max"] <= 12 and info["truncated_share"] == 0.0
    assert dict(info["top_words"])["background"] > 0
    sheet = write_sheet(report, tmp_path / "sheet.png")
    assert Image.open(sheet).size[0] > 128 * 3
    partial = inspect_source(str(tmp_path / "shapes"), limit=10).as_dict()
    assert not partial["complete"] and partial["scanned"] == 10
    assert 20 <= partial["estimated_samples"] <= 80
    assert "40 samples; 40 good, 0 bad" in format_report(info)
