"""Webdataset shards read through the `datasets` library's webdataset builder, undecoded.

The stock builder (`load_dataset("webdataset", ..., streaming=True)`) is almost what we need,
but two of its habits end a whole stream on one bad sample: it parses KEY.json inside the tar
reader (one malformed JSON raises and stops the iterator) and it infers columns from the first
five samples (an image without JSON among them raises). So we use the same builder with no
field decoders and a fixed schema of raw-bytes columns, and parse each sample ourselves, which
turns every failure into a per-sample `BadSample`.

A shard is read on its own, from a given sample offset, so a data position is just
(shard, samples into it). A shard that stops reading part way (truncated tar, network) ends
there; the error is reported once and reading continues with the next shard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from t2i.data.errors import BadSample
from t2i.data.transforms import IMAGE_EXTENSIONS, Transform, load_training_image

CAPTION_COLUMNS = ("json", "txt")
READ_CHUNK = 8  # rows per datasets batch; a read error loses at most this many good rows
COLUMNS = IMAGE_EXTENSIONS + CAPTION_COLUMNS


def _builder_class() -> type:
    """The `datasets` webdataset builder with field decoding switched off (imported lazily:
    `datasets` costs ~1 s to import and the shapes set never needs it)."""
    global _RAW_BUILDER
    if _RAW_BUILDER is None:
        from datasets.packaged_modules.webdataset.webdataset import WebDataset

        class RawWebDataset(WebDataset):
            DECODERS: dict = {}  # every field stays bytes; we parse JSON per sample

        _RAW_BUILDER = RawWebDataset
    return _RAW_BUILDER


_RAW_BUILDER: type | None = None


def preload() -> None:
    """Import the `datasets` machinery now (before DataLoader workers fork)."""
    _builder_class()
    raw_features()


def raw_features() -> Any:
    import datasets

    return datasets.Features({**{c: datasets.Value("binary") for c in COLUMNS},
                              "__key__": datasets.Value("string"),
                              "__url__": datasets.Value("string")})


def stream_dataset(url: str) -> Any:
    """A streaming `datasets.IterableDataset` over one shard with raw-bytes columns."""
    from datasets.data_files import DataFilesDict, DataFilesList

    # A resolved DataFilesDict skips pattern globbing (a Hub round trip per shard).
    files = DataFilesDict({"train": DataFilesList([url], origin_metadata=[None])})
    builder = _builder_class()(data_files=files, features=raw_features())
    return builder.as_streaming_dataset(split="train")


@dataclass(frozen=True)
class ShardReadError:
    """A shard stopped reading before its end (after `offset` samples)."""

    url: str
    offset: int
    detail: str


def read_shard(url: str, start: int = 0) -> Iterator[tuple[int, dict] | ShardReadError]:
    """Yield (offset, raw example) for samples `start`.. of one shard; on a read failure yield
    one ShardReadError and stop. Skipping reads the bytes but decodes nothing."""
    offset = 0
    try:
        # .iter() rather than iter(): inside a DataLoader worker, datasets' own __iter__ would
        # split the shard list across workers again (we already gave each worker its shards).
        for chunk in stream_dataset(url).iter(batch_size=READ_CHUNK):
            columns = list(chunk)
            for row in zip(*chunk.values()):
                if offset >= start:
                    yield offset, dict(zip(columns, row))
                offset += 1
        return
    except Exception as err:  # tarfile.ReadError, OSError, network errors: this shard ends
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        yield ShardReadError(url, offset, f"{type(err).__name__}: {detail}")


def parse_prompt(example: dict) -> str:
    """The caption of a raw example: KEY.json {"prompt": ...}, else KEY.txt."""
    raw_json = example.get("json")
    if raw_json is not None:
        try:
            meta = json.loads(raw_json)
        except (UnicodeDecodeError, ValueError) as err:
            raise BadSample("bad_json", f"{type(err).__name__}: {err}") from None
        if not isinstance(meta, dict):
            raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
        prompt = meta.get("prompt")
        if not isinstance(prompt, str):
            raise BadSample("no_prompt", "no 'prompt' key" if prompt is None
                            else f"'prompt' is {type(prompt).__name__}")
    elif example.get("txt") is not None:
        try:
            prompt = example["txt"].decode("utf-8")
        except UnicodeDecodeError as err:
            raise BadSample("no_prompt", f"KEY.txt is not UTF-8: {err}") from None
    else:
        raise BadSample("no_caption", "no KEY.json or KEY.txt")
    prompt = prompt.strip()
    if not prompt:
        raise BadSample("empty_prompt")
    return prompt


def image_bytes(example: dict) -> bytes:
    for column in IMAGE_EXTENSIONS:
        if example.get(column) is not None:
            return example[column]
    raise BadSample("no_image", "caption without an image file")


def decode_example(example: dict, transform: Transform, aug_seed: int
                   ) -> tuple[np.ndarray, str, str | None]:
    """Raw example -> ((H, W, 3) uint8 image, prompt, converted mode or None).
    `aug_seed` (63-bit, derived from the sample) fixes the random crop offset and flip."""
    data = image_bytes(example)
    prompt = parse_prompt(example)
    u = (aug_seed & 0xFFFFFFFF) / 2.0**32
    flip = bool((aug_seed >> 32) & 1)
    array, converted = load_training_image(data, transform, u, flip)
    return array, prompt, converted
