"""Webdataset shards read as plain tar streams, undecoded: one sample is the run of
consecutive files that share a key (`KEY.jpg`, `KEY.json`, ...), each kept as bytes under its
lower-cased extension (`KEY.JPG` is the `jpg` of KEY), and parsed by us, which turns every
failure into a per-sample `BadSample`.

We read the tar ourselves rather than through the `datasets` webdataset builder: that builder
parses KEY.json inside the tar reader (one malformed JSON stops the whole iterator), keeps
extensions case-sensitive, and, like Python's `tarfile` in stream mode, ends a shard silently
when the stream is cut inside a header block. Here a shard ends only at the tar's
end-of-archive zero block; any other end (cut inside a header or inside member data, a damaged
header, a stream that stops at a member boundary) is reported as a `ShardIssue`.

Webdataset's rule holds: a sample's files must be next to each other in the tar. A tar made
as `tar cf x.tar *.jpg *.json` splits every key into an image-only and a caption-only sample
(no_caption and no_image in equal numbers); member_order_hint says so in the reports.

A shard is read on its own, from a given sample offset, so a data position is just
(shard, samples into it). A shard that stops reading part way (truncated tar, network) ends
there; the error is reported once and reading continues with the next shard. A remote shard
(a URL) is first opened again from where it stopped, after each of REMOTE_RETRY_DELAYS_S, as
long as it keeps failing (a retry that gets further starts the count again): a dropped
connection half way through a 10 GB Hub shard costs a re-read of the samples before the cut,
not the rest of the shard. A shard that holds no sample at all is reported as empty.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np

from t2i.data.errors import BadSample
from t2i.data.sources import is_remote, shard_name
from t2i.data.transforms import IMAGE_EXTENSIONS, Transform, load_training_image

log = logging.getLogger("t2i.data")

DUPLICATE = "__duplicate__"  # set on a sample that holds two files with one extension
ORDER_HINT = ("a sample's files (KEY.jpg, KEY.json) must be next to each other in the tar: "
              "make it with GNU `tar --sort=name -cf OUT.tar FOLDER` (the folder, not "
              "`FOLDER/*.jpg FOLDER/*.json`: tar keeps the order it is given), or `t2i-data "
              "pack` images with .txt captions")


REMOTE_RETRY_DELAYS_S = (2.0, 8.0, 30.0)  # waits before re-opening a remote shard that stopped


class ShardCut(Exception):
    """A tar stream that ends anywhere but at its end-of-archive block."""


class _StrictTarInfo(tarfile.TarInfo):
    """`tarfile` ends a stream silently at a cut, missing or damaged header block after the
    first; here only the end-of-archive zero block (or a 0-byte file: no samples) ends it."""

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        start = tar.fileobj.tell()
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            raise  # the end-of-archive marker
        except tarfile.EmptyHeaderError:
            if start == 0:
                raise tarfile.EOFHeaderError("empty file") from None
            raise ShardCut(f"the tar stops at byte {start} without its end-of-archive "
                           f"blocks") from None
        except tarfile.HeaderError as err:
            raise ShardCut(f"cut or damaged header block at byte {start} ({err})") from None


def preload() -> None:
    """Import the remote-file machinery now (before DataLoader workers fork; `datasets`
    costs ~1 s to import and local shards never need it)."""
    import datasets.utils.file_utils  # noqa: F401


def open_shard(url: str) -> BinaryIO:
    """A local path, or a URL (hf://, https://, ...) opened as a forward-only stream through
    `datasets`' xopen, as its webdataset builder does (Hub authentication, retried reads)."""
    if "://" not in url:
        return open(url, "rb")
    from datasets.utils.file_utils import xopen

    return xopen(url, "rb", block_size=0)  # block_size=0: stream, no read-ahead


def tar_files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular, non-hidden file of a tar stream (plain or compressed), in
    order. Raises ShardCut, tarfile.ReadError or OSError when the stream ends early."""
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for info in tar:
            if is_sample_file(info):
                yield info.name, tar.extractfile(info).read()  # a cut in the data raises
            tar.members = []  # stream mode keeps every header otherwise


def is_sample_file(info: tarfile.TarInfo) -> bool:
    """A regular file whose name does not start with "." or "__" (hidden, metadata)."""
    return info.isreg() and not os.path.basename(info.name).startswith((".", "__"))


def sample_byte_offset(path: str, start: int) -> int | None:
    """The byte where sample `start` of the local, uncompressed tar `path` begins (the header of
    its first file), found from the headers alone: tarfile's seekable mode steps over member
    data, so skipping into a 10 GB shard reads ~1 KB a sample, not the samples. None when the
    tar is compressed, damaged before that sample or holds fewer samples: the streamed read
    then skips or reports as usual. Samples are counted as group_samples groups them."""
    try:  # unbuffered: a buffered file would read 8 KB at every header
        with open(path, "rb", buffering=0) as raw, \
                tarfile.open(fileobj=raw, mode="r:", tarinfo=_StrictTarInfo) as tar:
            index, previous = -1, None
            for info in tar:
                tar.members = []
                key = split_name(info.name)[0] if is_sample_file(info) else None
                if key is None:
                    continue
                if key != previous:
                    index, previous = index + 1, key
                    if index == start:
                        return info.offset
    except (tarfile.TarError, ShardCut, OSError):
        return None
    return None


def is_tar_file(path: str | Path) -> bool:
    """True when the local file `path` starts with a tar header (plain or compressed): a tar
    shard, whole or cut later on. Reads its first header only."""
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


def split_name(name: str) -> tuple[str | None, str]:
    """"dir/KEY.seg.PNG" -> ("dir/KEY", "seg.png"): the key runs to the first dot of the file
    name, the rest is the extension, compared in lower case (webdataset's rule, plus case)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def group_samples(url: str, files: Iterator[tuple[str, bytes]]) -> Iterator[dict]:
    """Consecutive files with one key -> {"__key__", "__url__", ext: bytes, ...}. A file whose
    extension repeats within a sample (KEY.jpg and KEY.JPG) marks the sample DUPLICATE.
    The last sample is yielded only once `files` ends cleanly (a cut may have taken its files)."""
    current: dict = {}
    for name, data in files:
        key, ext = split_name(name)
        if key is None:
            continue
        if current and current["__key__"] != key:
            yield current
            current = {}
        current.setdefault("__key__", key)
        current.setdefault("__url__", url)
        if ext in current:
            current[DUPLICATE] = ext
        else:
            current[ext] = data
    if current:
        yield current


@dataclass(frozen=True)
class ShardIssue:
    """A shard that gave less than a whole tar: `kind` "shard_error" (it stopped reading after
    `offset` samples, `detail` says why) or "empty_shard" (it ended cleanly with no sample)."""

    kind: str
    url: str
    offset: int
    detail: str


def read_shard(url: str, start: int = 0) -> Iterator[tuple[int, dict] | ShardIssue]:
    """Yield (offset, raw example) for samples `start`.. of one shard; on a read failure yield
    one ShardIssue("shard_error") and stop (a remote shard is first re-opened from the failed
    offset, see the module docstring); a shard without samples yields one
    ShardIssue("empty_shard"). Skipping decodes nothing; in a local uncompressed tar it reads
    only the headers of the samples skipped (see read_from)."""
    delays = REMOTE_RETRY_DELAYS_S if is_remote(url) else ()
    passed, failures = 0, 0  # the most samples a read got past; failed reads since then
    while True:
        seen = [0]  # samples this read got past, skipped ones included
        try:
            yield from read_from(url, max(start, passed), seen)
        except Exception as err:  # ShardCut, tarfile.ReadError, OSError, network errors
            detail = " ".join(str(err).split())[:200] or type(err).__name__
            failures = 1 if seen[0] > passed else failures + 1
            passed = max(passed, seen[0])
            if failures > len(delays):
                yield ShardIssue("shard_error", url, passed, f"{type(err).__name__}: {detail}")
                return
            log.warning("shard %s stopped after sample %d (%s: %s); reading it again from there "
                        "in %g s", shard_name(url), passed, type(err).__name__, detail,
                        delays[failures - 1])
            time.sleep(delays[failures - 1])
            continue
        if seen[0] == 0:
            yield ShardIssue("empty_shard", url, 0, "the shard holds no sample")
        return


def read_from(url: str, start: int, seen: list[int]) -> Iterator[tuple[int, dict]]:
    """(offset, raw example) for samples `start`.. of one read of the shard; seen[0] is kept
    at the number of samples passed so far (skipped ones included). A local uncompressed tar
    is entered at sample `start`'s byte (sample_byte_offset); other shards are read from
    their first byte, the samples before `start` skipped undecoded. Raises what the read
    raises."""
    at = sample_byte_offset(url, start) if start > 0 and not is_remote(url) else None
    with open_shard(url) as stream:
        if at is not None:
            stream.seek(at)
        first = 0 if at is None else start
        for offset, example in enumerate(group_samples(url, tar_files(stream)), first):
            if offset >= start:
                yield offset, example
            seen[0] = offset + 1


def parse_prompt(example: dict) -> str:
    """The caption of a raw example, stripped: KEY.json's "prompt" when it is a non-blank
    string, else KEY.txt (img2dataset shards hold KEY.json {"caption": ...} and KEY.txt).
    Raises BadSample "no_caption" without either file; with a KEY.txt, the sample stands or
    falls by it ("no_prompt": not UTF-8, "empty_prompt": blank), whatever the JSON's problem;
    with KEY.json alone, the JSON's ("bad_json": not UTF-8 JSON or not an object,
    "no_prompt": no string "prompt", "empty_prompt": a blank one)."""
    raw_json, raw_txt = example.get("json"), example.get("txt")
    if raw_json is None and raw_txt is None:
        raise BadSample("no_caption", "no KEY.json or KEY.txt")
    if raw_json is not None:
        try:
            return json_prompt(raw_json)
        except BadSample:
            if raw_txt is None:
                raise
    return txt_prompt(raw_txt)


def json_prompt(raw: bytes) -> str:
    """The stripped "prompt" of a KEY.json. Raises BadSample "bad_json", "no_prompt" or
    "empty_prompt" (see parse_prompt)."""
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # deeply nested: Recursion
        raise BadSample("bad_json", f"{type(err).__name__}: {err}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"expected an object, got {type(meta).__name__}")
    prompt = meta.get("prompt")
    if not isinstance(prompt, str):
        raise BadSample("no_prompt", "no 'prompt' key" if prompt is None
                        else f"'prompt' is {type(prompt).__name__}")
    if not prompt.strip():
        raise BadSample("empty_prompt", "KEY.json's 'prompt' is blank")
    return prompt.strip()


def txt_prompt(raw: bytes) -> str:
    """The stripped text of a KEY.txt. Raises BadSample "no_prompt" (not UTF-8) or
    "empty_prompt" (blank)."""
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadSample("no_prompt", f"KEY.txt is not UTF-8: {err}") from None
    if not prompt.strip():
        raise BadSample("empty_prompt", "KEY.txt is blank")
    return prompt.strip()


def caption_or_empty(example: dict) -> str:
    """parse_prompt's caption, or "" where it would raise BadSample."""
    try:
        return parse_prompt(example)
    except BadSample:
        return ""


def member_order_hint(kinds: Iterable[str]) -> str:
    """ORDER_HINT when the bad-sample `kinds` met hold both "no_image" and "no_caption": the
    mark of a tar whose files of one key are apart (say all images, then all captions),
    which webdataset reads as two samples, neither whole. Else ""."""
    met = set(kinds)
    return ORDER_HINT if {"no_image", "no_caption"} <= met else ""


def image_bytes(example: dict) -> bytes:
    """The image file of a raw example (the first of IMAGE_EXTENSIONS it holds).
    Raises BadSample("no_image"), or BadSample("duplicate_file") for two files that share a
    key and an extension."""
    if DUPLICATE in example:
        raise BadSample("duplicate_file", f"two .{example[DUPLICATE]} files under one key")
    for column in IMAGE_EXTENSIONS:
        if example.get(column) is not None:
            return example[column]
    raise BadSample("no_image", "caption without an image file")


def decode_example(example: dict, transform: Transform, aug_seed: int, captions: bool = True
                   ) -> tuple[np.ndarray, str, str | None]:
    """Raw example -> ((H, W, 3) uint8 image, prompt, converted mode or None).
    `aug_seed` (63-bit, derived from the sample) fixes the random crop offset and flip.
    `captions` False (stage 1, which reads no caption): a sample whose caption is missing or
    bad is a good image with prompt "" (parse_prompt's BadSample kinds are not raised)."""
    data = image_bytes(example)
    prompt = parse_prompt(example) if captions else caption_or_empty(example)
    u = (aug_seed & 0xFFFFFFFF) / 2.0**32
    flip = bool((aug_seed >> 32) & 1)
    array, converted = load_training_image(data, transform, u, flip)
    return array, prompt, converted
