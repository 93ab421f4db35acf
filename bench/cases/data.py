"""`data`: samples/s of 512 -> 256 decode + transform + tokenize from local webdataset shards,
ours (reduced-scale JPEG decode, one-pass crop+resize, in process and with N DataLoader workers)
against the plain `datasets` webdataset iterator with a PIL resize, in the same interleaved run.
Also `shapes`: batches/s of the built-in shapes set at 32 x 64 x 64.

The shards are generated in a temporary folder: 512x512 JPEGs (q90, smooth content plus
sensor-like noise, ~100 kB each, a little larger than the real set's) with 40-60 word
prompts. Each timed call reads the whole set once, start-up included (opening the shards,
forking the workers), the same way for every variant.
"""

from __future__ import annotations

import io
import os
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from bench.core import BenchContext, add_ratios, register_case, result_row, time_alternating
from t2i.config import DataConfig
from t2i.data import build_loader
from t2i.data.pack import ShardWriter, sample_json

SOURCE_SIZE, TARGET = 512, 256
WORDS = ("a photo of the old lighthouse on a rocky coast at sunset with golden light and "
         "dramatic clouds over the sea, highly detailed, cinematic, portrait of a woman "
         "wearing a red dress in a busy city street at night, neon signs, rain reflections, "
         "watercolor painting of a quiet forest lake with mountains in the background").split()


def _tokenizer() -> Callable[[list[str]], torch.Tensor]:
    try:
        from t2i.models.text import tokenize
    except ImportError:
        from open_clip import tokenize
    return tokenize


def _photo(rng: np.random.Generator) -> bytes:
    base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((SOURCE_SIZE, SOURCE_SIZE),
                                                     Image.Resampling.BICUBIC), np.int16)
    noisy = smooth + rng.normal(0, 12, smooth.shape).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_shards(folder: Path, samples: int, shards: int) -> list[str]:
    rng = np.random.default_rng(0)
    with ShardWriter(folder, shard_size=-(-samples // shards)) as writer:
        for i in range(samples):
            prompt = " ".join(rng.choice(WORDS, int(rng.integers(40, 61))))
            writer.write(f"{i:09d}", {"jpg": _photo(rng), "json": sample_json(prompt)})
    return [str(p) for p in writer.shards]


def plain_datasets(files: list[str], batch_size: int, tokenize: Callable, workers: int = 0
                   ) -> Callable[[], int]:
    """The baseline: stock streaming webdataset loader (decodes to PIL), PIL resize of the
    shorter side, centre crop, tensor in [-1, 1], tokenize per batch."""
    import datasets

    def transform(image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        scale = TARGET / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - TARGET) // 2, (image.height - TARGET) // 2
        image = image.crop((left, top, left + TARGET, top + TARGET))
        x = torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)  # (3, H, W)
        return x.float().div(127.5).sub(1)

    def collate(rows: list[dict]) -> dict:
        return {"image": torch.stack([transform(r["jpg"]) for r in rows]),
                "tokens": tokenize([r["json"]["prompt"] for r in rows])}

    def run() -> int:
        ds = datasets.load_dataset("webdataset", data_files={"train": files}, split="train",
                                   streaming=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, collate_fn=collate,
                                             num_workers=workers)
        return sum(len(b["tokens"]) for b in loader)

    return run


def ours(folder: Path, batch_size: int, batches: int, tokenize: Callable, workers: int
         ) -> Callable[[], int]:
    cfg = DataConfig(source=str(folder), resolution=TARGET, workers=workers, shuffle_buffer=256)

    def run() -> int:
        loader = iter(build_loader(cfg, batch_size=batch_size, tokenize=tokenize, seed=0))
        count = sum(len(next(loader)["tokens"]) for _ in range(batches))
        loader.close()  # joins the workers, so their CPU time is counted now
        return count

    return run


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def with_cpu_time(fn: Callable[[], int], record: list[float]) -> Callable[[], int]:
    def run() -> int:
        start = cpu_seconds()
        out = fn()
        record.append(cpu_seconds() - start)
        return out

    return run


@register_case("data")
def data_case(ctx: BenchContext) -> list[dict]:
    samples, batch_size = (64, 16) if ctx.quick else (512, 32)
    workers = max(2, min(4, os.cpu_count() or 1))
    shards = 2 * workers
    repeats = min(ctx.repeats, 2 if ctx.quick else 3)
    tokenize = _tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_shards(folder, samples, shards)
        fns = {
            "plain datasets, 1 process": plain_datasets(files, batch_size, tokenize),
            "ours, 1 process": ours(folder, batch_size, samples // batch_size, tokenize, 0),
            f"plain datasets, {workers} workers": plain_datasets(files, batch_size, tokenize,
                                                                 workers),
            f"ours, {workers} workers": ours(folder, batch_size, samples // batch_size,
                                             tokenize, workers),
        }
        cpu: dict[str, list[float]] = {name: [] for name in fns}
        fns = {name: with_cpu_time(fn, cpu[name]) for name, fn in fns.items()}
        stats = time_alternating(fns, ctx=ctx, warmup=0 if ctx.quick else 1, repeats=repeats)
    rows = []
    for name, s in stats.items():
        procs = workers if "workers" in name else 1
        rate = samples / s["median_s"]
        cpu_per_call = statistics.median(cpu[name])
        # *_per_sec, not *_per_s: the table formatter reads a trailing "_s" as seconds.
        # samples_per_cpu_sec (CPU time of all processes) is the per-core rate that a busy,
        # shared machine distorts least.
        rows.append(result_row("data", name, s, samples=samples, samples_per_sec=rate,
                               processes=procs, per_core_samples_per_sec=rate / procs,
                               samples_per_cpu_sec=samples / cpu_per_call,
                               source=f"{SOURCE_SIZE}->{TARGET} jpeg", batch_size=batch_size))
    add_ratios(rows[:2], "plain datasets, 1 process")
    add_ratios(rows[2:], f"plain datasets, {workers} workers")
    for ours_row, plain_row in ((rows[1], rows[0]), (rows[3], rows[2])):
        ours_row["cpu_ratio"] = ours_row["samples_per_cpu_sec"] / plain_row["samples_per_cpu_sec"]
    return rows


@register_case("shapes")
def shapes_case(ctx: BenchContext) -> list[dict]:
    batch_size, resolution, batches = 32, 64, 20 if ctx.quick else 100
    cfg = DataConfig(source="shapes", resolution=resolution)
    loader = iter(build_loader(cfg, batch_size=batch_size, tokenize=_tokenizer(), seed=0))
    next(loader)  # fills most of the caption token cache
    stats: dict[str, Any] = time_alternating({"shapes": lambda: next(loader)}, ctx=ctx,
                                             repeats=batches, warmup=2)["shapes"]
    return [result_row("shapes", f"shapes {batch_size}x{resolution}x{resolution}", stats,
                       batches_per_sec=1 / stats["median_s"],
                       samples_per_sec=batch_size / stats["median_s"])]
