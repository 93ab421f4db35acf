"""Packing a folder of captioned images into shards, exporting shapes as shards, and loading
both back through the shard pipeline; dataset inspection."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.config import DataConfig
from t2i.data import DataError, build_loader, shapes
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
    assert report.unused["caption without image"] == ["orphan.txt"]
    assert [n.split()[0] for n in report.skipped["unreadable image"]] == ["broken.jpg"]
    assert ("packed 4 samples into 2 shard(s): 7 images found, 3 skipped"
            in report.summary())
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
    assert report.packed == 2 and report.unused["caption without image"] == ["missing.jpg"]
    assert report.unused["unreadable metadata line"] == ["metadata.jsonl:4"]
    assert dict(report.skipped) == {}
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


# ----------------------------------------------------------------------------------------------
# Pack stores what the loader would decode: bit depth from the mode, upright


def sixteen_bit_dark(size: int = 32) -> Image.Image:
    """16-bit grey, values 0..200 of 65535 (black), with a white 8x8 block at the top left."""
    values = (np.arange(size * size).reshape(size, size) % 201).astype(np.uint16)
    values[:8, :8] = 65535
    return Image.fromarray(values)


def exif_six(width: int = 48, height: int = 24) -> tuple[Image.Image, Image.Exif]:
    """Blue, a red 8x8 block at the stored top left, tagged orientation 6 (shown turned 90
    degrees clockwise: the block at the top right, width and height swapped)."""
    stored = Image.new("RGB", (width, height), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    return stored, exif


def packed_image(shard: Path, name: str) -> np.ndarray:
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            meta = member.name.endswith(".json") and json.loads(tar.extractfile(member).read())
            if meta and meta["file_name"] == name:
                stem = member.name[:-len(".json")]
                image_name = next(n for n in tar.getnames() if n.startswith(stem + ".")
                                  and not n.endswith(".json"))
                with Image.open(tar.extractfile(image_name)) as image:
                    assert image.getexif().get(0x0112, 1) == 1  # no tag left to apply twice
                    return np.asarray(image.convert("RGB"))
    raise AssertionError(name)


def test_pack_stores_sixteen_bit_and_exif_images_as_the_loader_sees_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    sixteen_bit_dark().save(src / "dark16.png")
    stored, exif = exif_six()
    stored.save(src / "turned.png", exif=exif)
    for name in ("dark16", "turned"):
        (src / f"{name}.txt").write_text(f"the {name} image")
    report = pack_folder(src, tmp_path / "out")
    assert report.packed == 2
    dark = packed_image(report.shards[0], "dark16.png")[..., 0]
    assert dark[:8, :8].min() >= 250  # 65535 -> 255
    assert dark[12:, 12:].max() <= 4  # 0..200 of 65535 -> 0 or 1 (+ JPEG error), not 0..200
    turned = packed_image(report.shards[0], "turned.png")
    assert turned.shape == (48, 24, 3)  # upright: 24 wide, 48 high
    assert turned[3, 20, 0] > 200 and turned[3, 3, 2] > 200  # the red block at the top right


def test_pack_keep_format_and_jpeg_copies_decode_like_load_image(tmp_path):
    """Stored as they are, the images reach the loader with the same rules applied."""
    from t2i.data.transforms import load_image

    src = tmp_path / "src"
    src.mkdir()
    sixteen_bit_dark().save(src / "dark16.png")
    stored, exif = exif_six(64, 32)
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red: shown as the top half
    stored.save(src / "turned.jpg", exif=exif, quality=95)
    (src / "dark16.txt").write_text("dark")
    (src / "turned.txt").write_text("turned")
    report = pack_folder(src, tmp_path / "out", keep_format=True)
    with tarfile.open(report.shards[0]) as tar:
        assert sorted(n.rsplit(".", 1)[1] for n in tar.getnames()) == ["jpg", "json", "json",
                                                                      "png"]
    batches = {b["prompt"][0]: b["image"][0] for b in load_all(tmp_path / "out", 2)}
    dark = ((batches["dark"] + 1) * 127.5).round()  # (3, 32, 32) back to 0..255
    assert dark[0, :8, :8].min() == 255 and dark[0, 12:, 12:].max() == 1
    turned = batches["turned"]  # the centre 32x32 of the upright 32x64: red above blue
    assert turned[0, 4, 4] > 0.8 and turned[2, 4, 4] < -0.8  # top left red
    assert turned[0, 4, 28] > 0.8  # top right red too (sideways it would be blue)
    assert turned[2, 28, 4] > 0.8 and turned[0, 28, 4] < -0.8  # bottom blue
    upright = np.asarray(load_image(src / "turned.jpg"))
    assert upright.shape == (64, 32, 3) and upright[4, 28, 0] > 200 and upright[60, 4, 2] > 200


# ----------------------------------------------------------------------------------------------
# The output folder: new or empty, replaced only on request, never half written


def two_captioned(src: Path, count: int = 2) -> None:
    src.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image(40, 40, i).save(src / f"img{i}.jpg")
        (src / f"img{i}.txt").write_text(f"picture {i}")


def test_pack_refuses_a_folder_with_earlier_shards_and_replaces_them_on_request(tmp_path):
    two_captioned(tmp_path / "src", 6)
    out = tmp_path / "out"
    first = pack_folder(tmp_path / "src", out, shard_size=2)
    assert len(first.shards) == 3
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=r"output folder .*out' is not empty .*--overwrite"):
        pack_folder(tmp_path / "src", out, shard_size=4)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched
    again = pack_folder(tmp_path / "src", out, shard_size=4, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["data_000000.tar", "data_000001.tar"]
    assert [p.name for p in again.shards] == ["data_000000.tar", "data_000001.tar"]
    info = inspect_source(str(out), resolution=32).as_dict()
    assert info["samples"] == 6 and info["good"] == 6  # no duplicates from the first pack
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no staging left


def test_overwrite_never_deletes_files_that_are_not_shards(tmp_path):
    two_captioned(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that are not shards \(notes.md\)"):
        pack_folder(tmp_path / "src", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["notes.md"]
    with pytest.raises(DataError, match="is not empty"):
        export_shapes(out, count=4)


def test_an_interrupted_pack_leaves_no_output_folder(tmp_path):
    two_captioned(tmp_path / "src", 4)

    def interrupted(items):
        for n, item in enumerate(items):
            if n == 2:
                raise KeyboardInterrupt
            yield item

    with pytest.raises(KeyboardInterrupt):
        pack_folder(tmp_path / "src", tmp_path / "out", shard_size=1, progress=interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_pack_into_an_empty_folder_and_nothing_packed_leaves_it_empty(tmp_path):
    two_captioned(tmp_path / "src")
    (tmp_path / "out").mkdir()
    assert pack_folder(tmp_path / "src", tmp_path / "out").packed == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "bad" / "a.txt").write_text("caption")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"nothing packed .*unreadable image 1"):
        pack_folder(tmp_path / "bad", tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_an_image_whose_metadata_line_does_not_read_is_counted_once(tmp_path):
    """The broken line is the image's one skip reason (not again `no caption`); broken lines
    that cost no image are `unused`; packed + skipped images = the images found."""
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate("abcde"):
        image(40, 40, i).save(src / f"{name}.jpg")
    lines = [b'{"file_name": "a.jpg", "text": "fine a"}',
             b'{"file_name": "b.jpg", "text": "caf\xe9"}',  # Latin-1, not UTF-8
             b'{"file_name": "c.jpg", "text": "cut sh',  # no JSON
             b'{"file_name": "d.jpg", "text": 5}',  # text no string
             b'{"file_name": "d.jpg", "text": null}',  # d again: the image is counted once
             b'{"file_name": "e.jpg" "text": "no comma"}',  # e has a good line below
             b'{"file_name": "e.jpg", "text": "fine e"}',
             b'{"file_name": "gone.jpg", "text": 7}',  # names no image
             b'[1, 2]']  # names nothing
    (src / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = pack_folder(src, tmp_path / "out")
    assert dict(report.skipped) == {"unreadable metadata line": [
        "metadata.jsonl:2 (b.jpg)", "metadata.jsonl:3 (c.jpg)", "metadata.jsonl:4 (d.jpg)"]}
    assert dict(report.unused) == {"unreadable metadata line": [
        "metadata.jsonl:5 (d.jpg)", "metadata.jsonl:6 (e.jpg)", "metadata.jsonl:8 (gone.jpg)",
        "metadata.jsonl:9"]}
    assert report.packed == 2 and report.images == 5 == report.packed + report.skipped_images()
    assert report.summary().splitlines() == [
        "packed 2 samples into 1 shard(s): 5 images found, 3 skipped",
        "skipped 3 (unreadable metadata line): metadata.jsonl:2 (b.jpg), metadata.jsonl:3 "
        "(c.jpg), metadata.jsonl:4 (d.jpg)",
        "unused 4 (unreadable metadata line): metadata.jsonl:5 (d.jpg), metadata.jsonl:6 "
        "(e.jpg), metadata.jsonl:8 (gone.jpg), ..."]
    assert sorted(b["prompt"][0] for b in load_all(tmp_path / "out", 2)) == ["fine a", "fine e"]

def test_pack_finds_captions_and_images_in_any_case(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image(40, 40, 1).save(src / "UPPER.JPG", "JPEG")
    (src / "UPPER.TXT").write_text("upper case files")
    image(40, 40, 2).save(src / "mixed.Png", "PNG")
    (src / "mixed.Txt").write_text("mixed case files")
    (src / "lonely.TXT").write_text("no image")
    report = pack_folder(src, tmp_path / "out")
    assert report.packed == 2 and report.unused["caption without image"] == ["lonely.TXT"]
    assert sorted(b["prompt"][0] for b in load_all(tmp_path / "out", 2)) == [
        "mixed case files", "upper case files"]


def test_inspect_reports_upright_sizes_and_empty_shards(tmp_path):
    from t2i.data.pack import ShardWriter, sample_json

    stored, exif = exif_six(48, 24)
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    with ShardWriter(tmp_path / "d", 10) as writer:
        writer.write("turned", {"PNG": buffer.getvalue(), "json": sample_json("turned")})
    with tarfile.open(tmp_path / "d" / "data_000001.tar", "w"):
        pass  # an empty shard
    info = inspect_source(str(tmp_path / "d"), resolution=32).as_dict()
    assert info["good"] == 1 and info["sizes"] == {"24x48": 1} and info["formats"] == {"PNG": 1}
    assert info["empty_shards"] == ["data_000001.tar"] and info["shard_errors"] == []
    assert "empty shards  1: data_000001.tar" in format_report(info)


def test_a_second_metadata_line_for_one_file_is_reported_and_the_first_kept(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    image(40, 40, 1).save(src / "a.jpg")
    image(40, 40, 2).save(src / "b.jpg")
    rows = [{"file_name": "a.jpg", "text": "first a"}, {"file_name": "b.jpg", "text": "b"},
            {"file_name": "a.jpg", "text": "second a"}, {"file_name": "./a.jpg", "text": "third"}]
    (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    report = pack_folder(src, tmp_path / "out")
    assert report.packed == 2 and dict(report.skipped) == {} and dict(report.unused) == {
        "duplicate metadata line": ["metadata.jsonl:3 (a.jpg)", "metadata.jsonl:4 (./a.jpg)"]}
    assert ("unused 2 (duplicate metadata line): metadata.jsonl:3 (a.jpg), metadata.jsonl:4 "
            "(./a.jpg)") in report.summary()
    assert sorted(b["prompt"][0] for b in load_all(tmp_path / "out", 2)) == ["b", "first a"]
