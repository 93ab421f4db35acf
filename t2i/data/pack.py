"""Writing shards in the text-to-image-2M layout: `data_000000.tar` holding KEY.jpg +
KEY.json {"prompt": ...}. Used by `t2i-data pack` (a folder of captioned images) and
`t2i-data shapes` (the built-in set exported as shards).

Shards are written under a temporary name and renamed when complete, with fixed tar metadata
(mtime 0, uid 0, mode 0644) so that the same input gives byte-identical shards. The CLI
commands write a whole output folder at once (`output_folder`): into a hidden sibling folder
that is renamed to OUT when every shard is written, so OUT never mixes shards of two runs, and
an error or Ctrl-C leaves no half-written OUT. OUT must be new or empty; `overwrite=True`
replaces a folder that holds only shards from an earlier run (`data_NNNNNN.tar`).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import os
import re
import shutil
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from t2i.data import shapes
from t2i.data.errors import BadSample, DataError
from t2i.data.transforms import IMAGE_EXTENSIONS, decode, open_header
from t2i.rng import generator

SHARD_FILE = re.compile(r"data_\d{6}\.tar(\.tmp)?")  # what ShardWriter leaves in a folder


class ShardWriter:
    """Append samples; a new shard starts every `shard_size` samples."""

    def __init__(self, out_dir: str | Path, shard_size: int = 10_000, prefix: str = "data_"):
        if shard_size < 1:
            raise DataError(f"shard size must be positive, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size, self.prefix = shard_size, prefix
        self.shards: list[Path] = []
        self.samples = 0
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def _open(self) -> None:
        path = self.out_dir / f"{self.prefix}{len(self.shards):06d}.tar"
        self.shards.append(path)
        self._tar = tarfile.open(str(path) + ".tmp", "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            os.replace(str(self.shards[-1]) + ".tmp", self.shards[-1])
            self._tar = None

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """One sample: `files` maps extension ("jpg", "json", ...) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if self._tar is None or self._in_shard >= self.shard_size:
            self._close()
            self._open()
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._in_shard += 1
        self.samples += 1

    def close(self) -> list[Path]:
        self._close()
        return self.shards

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            Path(str(self.shards[-1]) + ".tmp").unlink(missing_ok=True)
            self.shards.pop()


def check_out(out: Path, overwrite: bool) -> None:
    """Raises DataError (one line) unless `out` is new, an empty folder, or, with `overwrite`,
    a folder holding only shards an earlier pack or export left (nothing else is deleted)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output {str(out)!r} is a file, not a folder")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise DataError(f"output folder {str(out)!r} is not empty ({len(entries)} entries, "
                        f"e.g. {entries[0]}): choose a new folder, or pass --overwrite to "
                        f"replace the shards of an earlier run")
    others = [name for name in entries if not SHARD_FILE.fullmatch(name)]
    if others:
        raise DataError(f"output folder {str(out)!r} holds files that are not shards "
                        f"({', '.join(others[:3])}): --overwrite only replaces data_NNNNNN.tar "
                        f"shards; choose a new folder")


@contextlib.contextmanager
def output_folder(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A staging folder beside `out` to write into; on success it becomes `out` (an earlier
    `out` is replaced only with `overwrite`, see check_out), on error it is removed.
    Raises DataError before anything is written when `out` may not be used, and for an
    OSError while writing (no permission, disk full)."""
    out = Path(out)
    check_out(out, overwrite)
    staging = out.parent / f".{out.name}.writing-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        yield staging
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise DataError(f"cannot write into {str(out)!r}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.is_dir():
        out.rename(old)  # holds only old shards or nothing (check_out)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    """4:4:4 chroma keeps flat colour edges clean (the shapes analyzer reads them back)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def sample_json(prompt: str, **extra: object) -> bytes:
    return json.dumps({"prompt": prompt, **extra}, ensure_ascii=False).encode()


# ----------------------------------------------------------------------------------------------
# Shapes -> shards
# ----------------------------------------------------------------------------------------------


def export_shapes(out_dir: str | Path, count: int, seed: int = 0, resolution: int = 64,
                  shard_size: int = 1000, batch: int = 256, overwrite: bool = False
                  ) -> list[Path]:
    """`count` shapes samples as shards in `out_dir` (written as a whole, see
    output_folder); JSON also holds the attributes for checking. Raises DataError for an
    `out_dir` that is not new or empty (without `overwrite`)."""
    spec = shapes.ShapesSpec(resolution=resolution)
    with output_folder(out_dir, overwrite) as staging, ShardWriter(staging, shard_size) as writer:
        for start in range(0, count, batch):
            n = min(batch, count - start)
            images, prompts, attrs = shapes.sample_batch(spec, n, generator(seed, "export", start))
            for j in range(n):
                a = attrs[j]
                writer.write(f"{start + j:09d}", {
                    "jpg": jpeg_bytes(Image.fromarray(images[j].numpy())),
                    "json": sample_json(prompts[j], colour=a.colour, shape=a.shape,
                                        position=a.position, background=a.background)})
    return [Path(out_dir) / p.name for p in writer.shards]


# ----------------------------------------------------------------------------------------------
# A folder of captioned images -> shards
# ----------------------------------------------------------------------------------------------


@dataclass
class PackReport:
    """What `pack_folder` did. Every image found is packed or in `skipped` under one reason,
    so images == packed + skipped_images(); a caption (a .txt file or a metadata.jsonl line)
    that costs no image, because it names none or another caption gave it, is in `unused`."""

    images: int = 0
    packed: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    unused: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def skipped_images(self) -> int:
        return sum(len(entries) for entries in self.skipped.values())

    def summary(self) -> str:
        lines = [f"packed {self.packed} samples into {len(self.shards)} shard(s): "
                 f"{self.images} images found, {self.skipped_images()} skipped"]
        for verb, kinds in (("skipped", self.skipped), ("unused", self.unused)):
            for reason, entries in sorted(kinds.items()):
                shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
                lines.append(f"{verb} {len(entries)} ({reason}): {shown}")
        return "\n".join(lines)


def find_pairs(src: Path, report: PackReport) -> list[tuple[Path, str]]:
    """(image, caption) pairs from `src/metadata.jsonl` (file_name, text) or same-name .txt
    files. Extensions are compared in any case (photo.JPG, photo.TXT). Every other image is
    counted in `report.skipped` once, under the most specific reason (its caption's fault
    where a caption was found). Raises DataError when metadata.jsonl cannot be read."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    images = [p for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    report.images = len(images)
    metadata = src / "metadata.jsonl"
    if metadata.is_file():
        captions = metadata_captions(src, metadata, images, report)
    else:
        texts = {p.with_suffix(""): p for p in files if p.suffix.lower() == ".txt"}
        image_stems = {p.with_suffix("") for p in images}
        for stem in sorted(set(texts) - image_stems):
            report.unused["caption without image"].append(str(texts[stem].relative_to(src)))
        captions = txt_captions(src, images, texts, report)
    pairs = []
    for image in images:
        rel, text = str(image.relative_to(src)), captions.get(image.resolve(), "")
        if image.resolve() not in captions:
            report.skipped["no caption"].append(rel)
        elif text is None:
            continue  # its caption's fault is counted already (once, for this image)
        elif not text.strip():
            report.skipped["empty caption"].append(rel)
        else:
            pairs.append((image, text.strip()))
    return pairs


def txt_captions(src: Path, images: list[Path], texts: dict[Path, Path],
                 report: PackReport) -> dict[Path, str | None]:
    """Resolved image path -> the text of its same-name .txt file (UTF-8, a leading BOM
    dropped), or None for a caption file that cannot be read or is not UTF-8: that one is
    reported here, never altered."""
    captions: dict[Path, str | None] = {}
    for image in images:
        text = texts.get(image.with_suffix(""))
        if text is None:
            continue
        key, rel = image.resolve(), str(text.relative_to(src))
        captions[key] = None  # until it reads as UTF-8
        try:
            captions[key] = text.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError:
            report.skipped["caption not UTF-8"].append(rel)
        except OSError as err:
            report.skipped["unreadable caption"].append(f"{rel} ({err.strerror or err})")
    return captions


def metadata_captions(src: Path, metadata: Path, images: list[Path],
                      report: PackReport) -> dict[Path, str | None]:
    """Resolved image path -> text from metadata.jsonl, or None for an image whose only line
    did not read (that line is its skip reason, `unreadable metadata line`, so the image is
    not counted again as `no caption`). A line is unreadable when it is not a UTF-8 JSON object
    with string file_name and text. In `report.unused`: a later line naming a file an earlier
    line named (the first line's caption is kept), lines naming no image, and unreadable lines
    that name no image, an image another line captions, or none we can tell. Raises DataError
    when the file cannot be read."""
    try:
        data = metadata.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {str(metadata)!r}: {err.strerror or err}") from None
    captions: dict[Path, str | None] = {}
    names: dict[Path, str] = {}  # as metadata.jsonl writes them (../x.jpg is outside src)
    unreadable: list[tuple[str, str | None]] = []  # (metadata.jsonl:N, the file it seems to name)
    for number, line in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), 1):
        if not line.strip():
            continue
        try:  # line by line: one bad byte costs its line only
            path, name, text = metadata_row(src, line)
        except (ValueError, KeyError, TypeError, RecursionError):  # deep nesting: Recursion
            unreadable.append((f"metadata.jsonl:{number}", named_file(line)))
            continue
        if path in captions:
            report.unused["duplicate metadata line"].append(f"metadata.jsonl:{number} ({name})")
            continue
        captions[path], names[path] = text, name
    image_set = {p.resolve() for p in images}
    for path in sorted(set(captions) - image_set):
        report.unused["caption without image"].append(names[path])
    for where, name in unreadable:
        path = resolved(src, name)
        if path in image_set and path not in captions:  # the image this line failed
            captions[path] = None
            report.skipped["unreadable metadata line"].append(f"{where} ({name})")
        else:
            report.unused["unreadable metadata line"].append(
                where + (f" ({name})" if name is not None else ""))
    return captions


def metadata_row(src: Path, line: bytes) -> tuple[Path, str, str]:
    """(resolved path, file_name, text) of one metadata.jsonl line. Raises ValueError,
    KeyError, TypeError or RecursionError for a line that is not a UTF-8 JSON object with
    string file_name and text."""
    row = json.loads(line.decode("utf-8"))
    name, text = row["file_name"], row["text"]
    if not (isinstance(name, str) and isinstance(text, str)):
        raise TypeError("file_name and text must be strings")
    return (src / name).resolve(), name, text


def resolved(src: Path, name: str | None) -> Path | None:
    """`src / name` resolved, or None for no name or one no path can have (a NUL byte)."""
    try:
        return (src / name).resolve() if name is not None else None
    except ValueError:
        return None


FILE_NAME = re.compile(r'"file_name"\s*:\s*("(?:[^"\\]|\\.)*")')


def named_file(line: bytes) -> str | None:
    """The file_name an unreadable metadata.jsonl line names: its first `"file_name": "..."`
    pair, read even when the rest of the line is no JSON or not UTF-8; None when there is no
    such pair."""
    match = FILE_NAME.search(line.decode("utf-8", errors="replace"))
    try:
        return json.loads(match.group(1)) if match else None
    except (ValueError, RecursionError):
        return None


def checked_image_bytes(path: Path, keep_format: bool) -> tuple[str, bytes]:
    """(extension, bytes): JPEGs are copied untouched (the loader applies their EXIF
    orientation), other formats become JPEG q95 of `load_image`'s pixels (upright, 8-bit by
    the image mode) unless `keep_format`. Every image is fully decoded once (JPEG at 1/8 scale)
    to catch damage. Raises BadSample("corrupt_image") for an image that does not decode."""
    data = path.read_bytes()
    header = open_header(data)
    fmt = header.format
    rgb, _ = decode(header, min_side=8 if fmt == "JPEG" else None)
    if fmt == "JPEG":
        return "jpg", data
    if keep_format:
        return path.suffix.lower().lstrip("."), data
    return "jpg", jpeg_bytes(rgb)


def pack_folder(src: str | Path, out: str | Path, shard_size: int = 10_000,
                keep_format: bool = False, overwrite: bool = False,
                progress: Callable[[Iterable], Iterator] = iter) -> PackReport:
    """Pack the captioned images of `src` into shards in `out` (written as a whole, see
    output_folder). Unreadable images are skipped and reported. Raises DataError for a
    missing `src`, one without captioned images, or an `out` that is not new or empty
    (without `overwrite`)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"pack source {str(src)!r} is not a folder")
    check_out(Path(out), overwrite)  # before the scan: a wrong OUT fails at once
    report = PackReport()
    pairs = find_pairs(src, report)
    if not pairs:
        raise DataError(f"pack source {str(src)!r} holds no captioned images "
                        f"(need same-name .txt files or metadata.jsonl with file_name, text)")
    with output_folder(out, overwrite) as staging, ShardWriter(staging, shard_size) as writer:
        for image, text in progress(pairs):
            try:
                ext, data = checked_image_bytes(image, keep_format)
            except (BadSample, OSError) as err:
                detail = err.detail if isinstance(err, BadSample) else str(err)
                report.skipped["unreadable image"].append(
                    f"{image.relative_to(src)} ({detail[:60]})")
                continue
            writer.write(f"{writer.samples:09d}", {
                ext: data, "json": sample_json(text, file_name=str(image.relative_to(src)))})
        if writer.samples == 0:  # leave OUT as it was
            skipped = ", ".join(f"{reason} {len(files)}" for reason, files in
                                sorted(report.skipped.items()))
            raise DataError(f"nothing packed from {str(src)!r}: every image was skipped "
                            f"({skipped})")
    report.packed = writer.samples
    report.shards = [Path(out) / p.name for p in writer.shards]
    return report
