"""Writing shards in the text-to-image-2M layout: `data_000000.tar` holding KEY.jpg +
KEY.json {"prompt": ...}. Used by `t2i-data pack` (a folder of captioned images) and
`t2i-data shapes` (the built-in set exported as shards).

Shards are written under a temporary name and renamed when complete, with fixed tar metadata
(mtime 0, uid 0, mode 0644) so that the same input gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from PIL import Image

from t2i.data import shapes
from t2i.data.errors import DataError
from t2i.data.transforms import IMAGE_EXTENSIONS
from t2i.rng import generator


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
                  shard_size: int = 1000, batch: int = 256) -> list[Path]:
    """`count` shapes samples as shards; JSON also holds the attributes for checking."""
    spec = shapes.ShapesSpec(resolution=resolution)
    with ShardWriter(out_dir, shard_size) as writer:
        for start in range(0, count, batch):
            n = min(batch, count - start)
            images, prompts, attrs = shapes.sample_batch(spec, n, generator(seed, "export", start))
            for j in range(n):
                a = attrs[j]
                writer.write(f"{start + j:09d}", {
                    "jpg": jpeg_bytes(Image.fromarray(images[j].numpy())),
                    "json": sample_json(prompts[j], colour=a.colour, shape=a.shape,
                                        position=a.position, background=a.background)})
    return writer.shards


# ----------------------------------------------------------------------------------------------
# A folder of captioned images -> shards
# ----------------------------------------------------------------------------------------------


@dataclass
class PackReport:
    packed: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> str:
        lines = [f"packed {self.packed} samples into {len(self.shards)} shard(s)"]
        for reason, files in sorted(self.skipped.items()):
            shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
            lines.append(f"skipped {len(files)} ({reason}): {shown}")
        return "\n".join(lines)


def find_pairs(src: Path, report: PackReport) -> list[tuple[Path, str]]:
    """(image, caption) pairs from `src/metadata.jsonl` (file_name, text) or same-name .txt."""
    images = sorted(p for p in src.rglob("*") if p.is_file()
                    and p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    metadata = src / "metadata.jsonl"
    captions: dict[Path, str] = {}
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[(src / row["file_name"]).resolve()] = str(row["text"])
            except (ValueError, KeyError, TypeError):
                report.skipped["unreadable metadata line"].append(f"metadata.jsonl:{number}")
        image_set = {p.resolve() for p in images}
        for path in sorted(set(captions) - image_set):
            report.skipped["caption without image"].append(str(path.relative_to(src.resolve())))
    else:
        image_stems = {p.with_suffix("") for p in images}
        for txt in sorted(src.rglob("*.txt")):
            if txt.with_suffix("") not in image_stems:
                report.skipped["caption without image"].append(str(txt.relative_to(src)))
    pairs = []
    for image in images:
        if metadata.is_file():
            text = captions.get(image.resolve())
        else:
            txt = image.with_suffix(".txt")
            text = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        rel = str(image.relative_to(src))
        if text is None:
            report.skipped["no caption"].append(rel)
        elif not text.strip():
            report.skipped["empty caption"].append(rel)
        else:
            pairs.append((image, text.strip()))
    return pairs


def checked_image_bytes(path: Path, keep_format: bool) -> tuple[str, bytes]:
    """(extension, bytes): JPEGs are copied untouched, other formats become JPEG q95 unless
    `keep_format`. The image is fully decoded once (at 1/8 scale for JPEG) to catch damage."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        fmt = image.format
        image.draft("RGB", (64, 64))  # reduced decode still reads every byte
        image.load()
        if fmt == "JPEG":
            return "jpg", data
        if keep_format:
            return path.suffix.lower().lstrip("."), data
    with Image.open(io.BytesIO(data)) as image:
        from t2i.data.transforms import to_rgb

        rgb, _ = to_rgb(image)
        return "jpg", jpeg_bytes(rgb)


def pack_folder(src: str | Path, out: str | Path, shard_size: int = 10_000,
                keep_format: bool = False,
                progress: Callable[[Iterable], Iterator] = iter) -> PackReport:
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"pack source {str(src)!r} is not a folder")
    report = PackReport()
    pairs = find_pairs(src, report)
    if not pairs:
        raise DataError(f"pack source {str(src)!r} holds no captioned images "
                        f"(need same-name .txt files or metadata.jsonl with file_name, text)")
    with ShardWriter(out, shard_size) as writer:
        for image, text in progress(pairs):
            try:
                ext, data = checked_image_bytes(image, keep_format)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                report.skipped["unreadable image"].append(
                    f"{image.relative_to(src)} ({type(err).__name__})")
                continue
            writer.write(f"{writer.samples:09d}", {
                ext: data, "json": sample_json(text, file_name=str(image.relative_to(src)))})
    report.packed, report.shards = writer.samples, writer.shards
    return report
