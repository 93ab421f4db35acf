"""Where a shard sample's caption comes from: KEY.json's "prompt", else KEY.txt (the
img2dataset layout: KEY.jpg, KEY.txt, KEY.json {"caption", "url", ...}), and which bad kind a
sample gets when neither gives one."""

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
from t2i.data import build_loader
from t2i.data.errors import BAD_KINDS, BadSample
from t2i.data.inspect import inspect_source
from t2i.data.pack import jpeg_bytes
from t2i.data.shards import parse_prompt

PROMPT = b'{"prompt": "from the json"}'
CAPTION = b'{"caption": "img2dataset keeps it here", "url": "http://x/1.jpg", "status": "success"}'


@pytest.mark.parametrize("files, expected", [
    ({"json": PROMPT}, "from the json"),  # text-to-image-2M
    ({"json": b'{"prompt": "  padded  "}'}, "padded"),
    ({"txt": b"from the txt\n"}, "from the txt"),
    ({"json": CAPTION, "txt": b"from the txt"}, "from the txt"),  # img2dataset
    ({"json": PROMPT, "txt": b"from the txt"}, "from the json"),  # the JSON's prompt first
    ({"json": b'{"prompt": "unterminated', "txt": b"from the txt"}, "from the txt"),
    ({"json": b"[1, 2]", "txt": b"from the txt"}, "from the txt"),
    ({"json": b'{"prompt": 3}', "txt": b"from the txt"}, "from the txt"),
    ({"json": b'{"prompt": " "}', "txt": b"from the txt"}, "from the txt"),
    ({"json": b'{"prompt": "unterminated'}, "bad_json"),
    ({"json": b"[1, 2]"}, "bad_json"),
    ({"json": CAPTION}, "no_prompt"),
    ({"json": b'{"prompt": null}'}, "no_prompt"),
    ({"json": b'{"prompt": "  "}'}, "empty_prompt"),
    ({"json": CAPTION, "txt": b" \n"}, "empty_prompt"),  # the txt decides once it is there
    ({"json": b"not json", "txt": b""}, "empty_prompt"),
    ({"json": CAPTION, "txt": b"caf\xe9"}, "no_prompt"),  # a txt that is not UTF-8
    ({}, "no_caption"),
])
def test_the_caption_is_the_json_prompt_else_the_txt_else_a_bad_kind(files, expected):
    example = {"__key__": "k", "__url__": "shard.tar", "jpg": b"...", **files}
    if expected in BAD_KINDS:
        with pytest.raises(BadSample) as bad:
            parse_prompt(example)
        assert bad.value.kind == expected
    else:
        assert parse_prompt(example) == expected


def fake_tokenize(prompts: list[str]) -> torch.Tensor:
    return torch.tensor([[len(p)] + [0] * 76 for p in prompts], dtype=torch.long)


def write_img2dataset_shard(path: Path, count: int) -> dict[str, str]:
    """`count` samples as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json without a
    "prompt"); returns key -> caption."""
    path.parent.mkdir(parents=True, exist_ok=True)
    captions = {}
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w") as tar:
        for i in range(count):
            key, caption = f"{i:09d}", f"a photo number {i}"
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success",
                    "caption": caption, "width": 24, "height": 24}
            for ext, data in [("jpg", jpeg_bytes(Image.fromarray(pixels))),
                              ("txt", caption.encode()), ("json", json.dumps(meta).encode())]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            captions[key] = caption
    return captions


def test_img2dataset_shards_train_and_inspect_with_their_txt_captions(tmp_path):
    captions = write_img2dataset_shard(tmp_path / "d" / "00000.tar", 6)
    cfg = DataConfig(source=str(tmp_path / "d"), resolution=16, shuffle_buffer=1, workers=0,
                     max_bad_fraction=0.0)
    batch = next(iter(build_loader(cfg, batch_size=6, tokenize=fake_tokenize, seed=0)))
    assert dict(zip(batch["key"], batch["prompt"])) == captions
    info = inspect_source(str(tmp_path / "d"), resolution=16).as_dict()
    assert info["good"] == 6 and info["bad_by_kind"] == {} and info["bad_samples"] == []


def write_uncaptioned_shard(path: Path, captions: list[bytes | None]) -> list[str]:
    """One image per entry of `captions`: KEY.json holding that (None: no caption file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    keys = []
    with tarfile.open(path, "w") as tar:
        for i, caption in enumerate(captions):
            key = f"{i:09d}"
            pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
            files = [("jpg", jpeg_bytes(Image.fromarray(pixels)))]
            files += [("json", caption)] if caption is not None else []
            for ext, data in files:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            keys.append(key)
    return keys


def test_stage_1_reads_images_whatever_their_captions(tmp_path):
    """The VAE reads no caption: an image without one, with a blank or a broken one is a good
    sample there (prompt ""), and a bad one for stage 2."""
    keys = write_uncaptioned_shard(tmp_path / "d" / "00000.tar",
                                   [PROMPT, None, b'{"prompt": " "}', b"{broken", CAPTION])
    cfg = DataConfig(source=str(tmp_path / "d"), resolution=16, shuffle_buffer=1, workers=0,
                     max_bad_fraction=1.0)
    images_only = build_loader(cfg, batch_size=5, tokenize=fake_tokenize, seed=0,
                               captions=False)
    batch = next(iter(images_only))
    assert batch["key"] == keys and batch["image"].shape == (5, 3, 16, 16)
    assert batch["prompt"] == ["from the json", "", "", "", ""]
    assert images_only.stats()["bad"] == 0
    captioned = build_loader(cfg, batch_size=1, tokenize=fake_tokenize, seed=0)
    batches = iter(captioned)
    assert [next(batches)["key"] for _ in range(2)] == [keys[:1], keys[:1]]  # one per pass
    assert captioned.stats()["bad_by_kind"] == {"no_caption": 1, "empty_prompt": 1,
                                                "bad_json": 1, "no_prompt": 1}
