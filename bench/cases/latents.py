"""`latents`: what encoding the data set once (`t2i-data encode`) costs and saves, side by side.

Size rows (computed, not timed): bytes per sample of a latent shard for the preset's VAE at 256
and 512 px (and both in one sample) in fp16, bf16 and fp32: the KEY.moments{R}.safetensors file
as `moments_bytes` writes it, plus the tar headers and block padding of it and of a typical
KEY.json (a 40-60 word prompt and the source fields), and the disk that 2.3M samples (the size
of text-to-image-2M's `data_512_2M`) need, against a 64 GiB disk.

Timed rows, alternating in one run on one thread count: the VAE encoder alone (`vae.encode` on a
batch of random images) and the whole `t2i-data encode` pipeline (t2i.data.encode: read 512 px
JPEG shards, decode at reduced scale, centre crop, encode, write fp16 moments, manifest) on
generated shards, both at --resolution (default 256) and in img/s; FLOPs per image from one
real encoder call. Then the stage-2 train step (the `train-step` case's wiring, the preset's
CPU batch) fed by the real loaders in process: JPEG shards with the VAE encoder in the step,
against latent shards of the same images; `ratio` is the step rate from latent shards over
the rate from JPEG shards. Every timed row also has `cpu_s`, this process's CPU seconds per
call, and `cpu_ratio` from it: on a machine shared with other jobs, CPU time counts the work
and not the waits for a core. Weights are random (speed does not depend on them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch

from bench.cases.data import WORDS, with_cpu_time, write_shards
from bench.core import (BenchContext, add_ratios, preset_config, register_case, result_row,
                        time_alternating)
from bench.flops import count_flops, throughput
from t2i import rng
from t2i.data import encode as enc
from t2i.data.latent_shards import moments_bytes, moments_extension
from t2i.models.vae import VAE
from t2i.sample import autocast_dtype

SAMPLES_2M = 2_300_000  # text-to-image-2M data_512_2M, about
DISK_GIB = 64


def tar_bytes(files: dict[str, bytes]) -> int:
    """Bytes the files take inside a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + 512 * math.ceil(len(data) / 512) for data in files.values())


def typical_json() -> bytes:
    prompt = " ".join(WORDS[:50])
    return json.dumps({"prompt": prompt, "source_shard": "data_000000.tar",
                       "source_key": "000000000"}).encode()


def size_rows(z: int, factor: int) -> list[dict]:
    """Bytes per sample and disk for 2.3M samples, per resolution set and dtype."""
    rows = []
    for resolutions in ((256,), (512,), (256, 512)):
        for dtype in ("fp16", "bf16", "fp32"):
            files = {"json": typical_json()}
            for r in resolutions:
                moments = torch.zeros(2 * z, r // factor, r // factor)  # (2z, R/f, R/f)
                files[moments_extension(r)] = moments_bytes(moments, dtype)
            per_sample = tar_bytes(files)
            disk = per_sample * SAMPLES_2M / 2**30
            rows.append({"case": "latents", "name": f"size {'+'.join(map(str, resolutions))}px "
                                                    f"{dtype}",
                         "moments_bytes": sum(len(v) for k, v in files.items() if k != "json"),
                         "bytes_per_sample": per_sample, "disk_2_3m_gib": disk,
                         "fits_64gib_disk": disk < DISK_GIB})
    return rows


def time_with_cpu(fns: dict[str, Callable], ctx: BenchContext, repeats: int
                  ) -> tuple[dict[str, dict], dict[str, float]]:
    """`time_alternating` (one warm-up call each) and the median CPU seconds of this process
    per timed call: on a shared machine CPU time counts the work done, wall time also the
    waiting for a core (see the `data` case)."""
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    timed = {name: with_cpu_time(fn, cpu[name]) for name, fn in fns.items()}
    stats = time_alternating(timed, ctx=ctx, warmup=1, repeats=repeats)
    return stats, {name: statistics.median(values[1:]) for name, values in cpu.items()}


def cpu_columns(row: dict, cpu_s: float, samples: int, base: dict | None = None) -> dict:
    """`cpu_s` (CPU seconds per call), samples per CPU second and, against `base`, cpu_ratio
    (its samples per CPU second over the baseline's; above 1: faster); in place."""
    row.update(cpu_s=cpu_s, samples_per_cpu_sec=samples / cpu_s)
    if base is not None:
        row["cpu_ratio"] = row["samples_per_cpu_sec"] / base["samples_per_cpu_sec"]
        row["cpu_ratio_vs"] = base["name"]
    return row


def encode_folder(vae: VAE, src: Path, out: Path, resolution: int, batch: int,
                  device: torch.device, dtype: torch.dtype | None) -> int:
    """Encode every shard of `src` into `out` as `t2i-data encode` does (in process, fp16
    moments); returns the number of samples."""
    plan = enc.plan_encode(str(src), out, subset="512", resolutions=(resolution,), dtype="fp16",
                           crop="center", batch_size=batch, precision="bench",
                           vae_sha256="bench", latent_scale=1.0, z_channels=vae.cfg.z_channels,
                           factor=vae.downsample_factor)
    enc.prepare_output(plan)
    enc.encode_shards(plan, vae, device=device, autocast_dtype=dtype)
    return enc.finish_output(plan).samples


def pipeline(vae: VAE, src: Path, resolution: int, batch: int, device: torch.device,
             dtype: torch.dtype | None) -> Callable[[], int]:
    """One call: `encode_folder` into a fresh temporary folder."""
    def run() -> int:
        with tempfile.TemporaryDirectory() as out:
            return encode_folder(vae, src, Path(out) / "latents", resolution, batch, device, dtype)

    return run


def stage2_rows(ctx: BenchContext, resolution: int, tmp: Path) -> list[dict]:
    """Stage-2 train steps fed by the real loaders (in process): JPEG shards with the VAE
    encoder in the step, against latent shards of the same images (fp16 moments), one shared
    train state, timed alternately. The step is the `train-step` case's wiring."""
    from bench.cases.train import bench_config, diffusion_setup
    from t2i.config import DataConfig
    from t2i.data import build_loader
    from t2i.models.text import tokenize
    from t2i.train import distributed
    from t2i.train.stages import Env, build_vae, step_settings
    from t2i.train.unet_stage import stored_latents

    base = bench_config(ctx, "unet")
    cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, resolution=resolution))
    env = Env(device=ctx.torch_device, world=distributed.World(), resume=False,
              show_progress=False)
    with rng.seeded(0, "bench-latents-stage2"):
        setup = diffusion_setup(cfg, env)
        vae = build_vae(cfg, env.device).eval().requires_grad_(False)
    b, repeats = cfg.train.batch_size, min(ctx.repeats, 2 if ctx.quick else 5)
    write_shards(tmp / "jpeg", b * (repeats + 1), 2)  # one warm-up batch, then the timed ones
    encode_folder(vae, tmp / "jpeg", tmp / "latents", resolution, b, env.device, None)

    def batches(folder: Path) -> Iterator[dict]:
        data = DataConfig(source=str(folder), resolution=resolution, workers=0, shuffle_buffer=b)
        return iter(build_loader(data, batch_size=b, seed=0,
                                 tokenize=lambda p: tokenize(p, cfg.text.context_length)))

    online = setup.make_step(step_settings(cfg, env, setup.stage, setup.lr, setup.total_steps),
                             setup.objective)
    stored = functools.partial(online, encode=stored_latents(vae, env.device))  # moments in
    cell = [setup.state]

    def driver(step: Callable, source: Iterator[dict]) -> Callable[[], None]:
        def run() -> None:
            cell[0], _ = step(cell[0], next(source))
        return run

    jpeg_name = f"stage-2 step {resolution}px, jpeg shards + vae.encode"
    fns = {jpeg_name: driver(online, batches(tmp / "jpeg")),
           f"stage-2 step {resolution}px, latent shards": driver(stored, batches(tmp / "latents"))}
    stats, cpu = time_with_cpu(fns, ctx, repeats)
    rows = [result_row("latents", name, s, batch=b, resolution=resolution, preset=ctx.preset,
                       precision="fp32", threads=torch.get_num_threads(),
                       samples_per_s=b / s["median_s"]) for name, s in stats.items()]
    cpu_columns(rows[0], cpu[jpeg_name], b)
    cpu_columns(rows[1], cpu[rows[1]["name"]], b, base=rows[0])
    return add_ratios(rows, jpeg_name)


@register_case("latents")
def latents_case(ctx: BenchContext) -> list[dict]:
    cfg = preset_config(ctx)
    device = ctx.torch_device
    resolution = ctx.resolution or (32 if ctx.quick else 256)
    samples, batch = (4, 2)  # few images: the small VAE takes seconds per image on a CPU core
    batch = ctx.batch or batch
    cast = autocast_dtype(device, ctx.dtype)
    with rng.seeded(0, "bench-latents"):
        vae = VAE(cfg.vae).to(device).eval().requires_grad_(False)
        x = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1  # (B, 3, R, R)
    rows = size_rows(cfg.vae.z_channels, cfg.vae.downsample_factor)

    @torch.no_grad()
    def encoder() -> torch.Tensor:
        with torch.autocast(device.type, dtype=cast, enabled=cast is not None):
            return vae.encode(x).mean

    flops = count_flops(encoder) / batch
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "shards"
        write_shards(src, samples, 2)
        fns = {f"vae.encode {resolution}px": encoder,
               f"t2i-data encode {resolution}px": pipeline(vae, src, resolution, batch, device,
                                                         cast)}
        stats, cpu = time_with_cpu(fns, ctx, min(ctx.repeats, 2 if ctx.quick else 3))
        steps = stage2_rows(ctx, resolution, Path(tmp))
    common = {"resolution": resolution, "batch": batch, "threads": torch.get_num_threads(),
              "precision": ctx.dtype, "preset": ctx.preset}
    (enc_name, enc_stats), (pipe_name, pipe_stats) = stats.items()
    encoder_row = result_row("latents", enc_name, enc_stats, **common,
                             **throughput(enc_stats, ctx=ctx, samples=batch,
                                          flops_per_sample=flops))
    pipe_row = result_row("latents", pipe_name, pipe_stats, **common,
                          samples_per_s=samples / pipe_stats["median_s"], images=samples,
                          source="512px jpeg shards")
    pipe_row["ratio"] = pipe_row["samples_per_s"] / encoder_row["samples_per_s"]
    pipe_row["ratio_vs"] = enc_name
    cpu_columns(encoder_row, cpu[enc_name], batch)
    cpu_columns(pipe_row, cpu[pipe_name], samples, base=encoder_row)
    return rows + [encoder_row, pipe_row] + steps


