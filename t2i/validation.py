"""The validation loss of stage 2: the denoising loss of the EMA weights on a fixed held-out set.

Everything that could vary between two evaluations is fixed, so the same weights and the same
set give the same number (bitwise on the CPU), in training (every `train.val_every` steps) and
in `t2i-eval RUN --suite val-loss`:
- the samples: the first `train.val_samples` usable samples of the held-out shards (every shard
  of `data.val_source`, or the `data.val_fraction` of `data.source`'s shards chosen by a hash of
  their names, which training never reads; see t2i/data/sources.py), read in file-name order,
  centre-cropped, never flipped; for the shapes set, draws from a seed of their own that
  training never uses (sample i from generator(VAL_SEED, "shapes", i));
- the latents: the VAE posterior mean times the latent scale (no sampling noise); for
  latent shards (t2i/data/latent_shards.py), the stored mean times the run VAE's scale;
- the noise: eps_i drawn from generator(VAL_SEED, "noise", i), one per sample;
- the timesteps: the midpoints of `train.val_timesteps` equal bins of [0, T), e.g. 62, 187,
  ..., 937 for 8 bins of T = 1000, every sample at every one of them;
- the batches: `train.val_batch_size` rows per forward, in order.
The loss is the unweighted mean squared error of the model's target (eps or v, as trained)
with no prompt dropout: comparable across runs with the same prediction type, whatever their
SNR weighting. Esser et al. 2024 (Stable Diffusion 3, arXiv:2403.03206) found that a validation
loss measured this way tracks GenEval and human preference as models scale.

This module sits beside sample.py and eval.py: it imports no training code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from t2i import rng
from t2i.config import Config, DataConfig
from t2i.data import DataError, shapes
from t2i.data.errors import BadSample
from t2i.data.latent_shards import (LatentManifest, decode_latent_example, manifest_path,
                                    read_manifest)
from t2i.data.loader import latent_folder, latent_manifest
from t2i.data.shards import ShardIssue, decode_example, read_shard
from t2i.data.sources import validation_shards
from t2i.data.transforms import Transform, to_float
from t2i.models.text import tokenize
from t2i.models.vae import DiagonalGaussian
from t2i.models.vae_files import vae_sha256
from t2i.sample import autocast
from t2i.schedulers import NoiseSchedule

log = logging.getLogger("t2i.validation")

VAL_SEED = 20240305  # root of the validation draws; no run seed: every run sees the same set


@dataclass(frozen=True)
class HeldOut:
    """The held-out samples before encoding: rows, their prompts and keys, where they came
    from, and what the rows are: "image" (N, 3, H, W) in [-1, 1], or "moments" (N, 2z, h, w),
    the posterior moments stored in latent shards."""

    rows: torch.Tensor
    prompts: list[str]
    keys: list[str]
    source: str
    kind: str = "image"


@dataclass(frozen=True)
class ValSet:
    """What a validation loss is computed on (all on one device): scaled latents (N, C, h, w),
    tokens (N, L), noise (N, C, h, w) and the timestep grid (K,) int64."""

    latents: torch.Tensor
    tokens: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    keys: list[str]
    source: str


def val_timesteps(num_train_timesteps: int, k: int) -> torch.Tensor:
    """(k,) int64: the midpoints floor((2j + 1) T / 2k) of k equal bins of [0, T)."""
    j = torch.arange(k, dtype=torch.int64)
    return (2 * j + 1) * num_train_timesteps // (2 * k)


def held_out(cfg: Config, n: int, source: str | None = None,
             vae_identity: str | None = None) -> HeldOut:
    """The first `n` held-out samples of the run `cfg` (see the module docstring), or of every
    shard of `source` when given ("shapes": the shapes validation draws). Fewer when the
    held-out shards hold fewer. Latent shards must hold `cfg.data.resolution` and, when
    `vae_identity` (t2i.models.vae_files.vae_sha256 of the run's VAE) is given, come from that
    VAE. Raises DataError when there is none or the latent shards do not fit."""
    data = cfg.data
    named = (source if source is not None else data.val_source).strip()
    if named == "shapes" or (not named and data.source == "shapes"):
        return held_out_shapes(data.resolution, n)
    option = "--data" if source is not None else "data.val_source"
    urls = [s.url for s in validation_shards(data.source, data.subset, named, data.val_fraction,
                                             option)]
    where = named or f"{data.source} (data.val_fraction {data.val_fraction:g})"
    if not urls:
        raise DataError(f"data source {data.source!r} has no held-out shards: set "
                        f"data.val_source or data.val_fraction, or pass held-out shards "
                        f"with --data")
    folder = latent_folder(named or data.source)
    if folder is None:
        transform = Transform(data.resolution, "center", False)
        return held_out_shards(sorted(urls), lambda ex: decode_example(ex, transform, 0)[:2],
                               n, where, "image")
    manifest = checked_manifest(folder, data.resolution, vae_identity)  # the stored moments
    h = data.resolution // manifest.downsample_factor
    shape = (2 * manifest.z_channels, h, h)
    return held_out_shards(sorted(urls), lambda ex: decode_latent_example(ex, data.resolution,
                                                                          shape),
                           n, where, "moments")


def checked_manifest(folder: str, resolution: int, vae_identity: str | None) -> LatentManifest:
    """The manifest of held-out latent shards, refused (DataError) as training refuses them:
    without moments at `resolution` (loader.latent_manifest), or made by another VAE than the
    one `vae_identity` names."""
    manifest = read_manifest(Path(folder).expanduser()) if manifest_path(
        Path(folder).expanduser()).is_file() else None
    if manifest is not None and resolution not in manifest.resolutions:  # the run's is fixed
        have = ", ".join(str(r) for r in manifest.resolutions)
        raise DataError(f"{str(manifest_path(folder))!r} holds latents at resolution {have}, "
                        f"not the run's data.resolution {resolution}: encode the held-out "
                        f"shards with --resolution {resolution}")
    manifest = latent_manifest(DataConfig(source=folder, resolution=resolution))
    if vae_identity is not None and manifest.vae_sha256 != vae_identity:
        raise DataError(f"{str(manifest_path(folder))!r} was encoded by another VAE (sha256 "
                        f"{manifest.vae_sha256[:16]}...) than this run's (sha256 "
                        f"{vae_identity[:16]}...): its validation loss would mean nothing; "
                        f"encode the held-out shards with the run's VAE")
    return manifest


def held_out_shapes(resolution: int, n: int) -> HeldOut:
    """n shapes images, sample i from its own generator: the first k of any n are the same."""
    spec = shapes.ShapesSpec(resolution=resolution)
    images, prompts = [], []
    for i in range(n):
        image, prompt, _ = shapes.sample_batch(spec, 1, rng.generator(VAL_SEED, "shapes", i))
        images.append(image)
        prompts += prompt
    return HeldOut(to_float(torch.cat(images)), prompts, [f"val-shapes-{i}" for i in range(n)],
                   "shapes (validation draws)")


def held_out_shards(urls: list[str], decode: Callable[[dict], tuple[Any, str]], n: int,
                    where: str, kind: str) -> HeldOut:
    """The first `n` usable samples of `urls`, read in order, each `decode`d into (row, prompt)
    (an image centre-cropped and never flipped, or stored moments); bad samples and the
    unreadable rest of a shard are skipped. Raises DataError when there is none."""
    found = list(itertools.islice(usable_samples(urls, decode), n))
    if not found:
        raise DataError(f"the held-out shards of {where!r} hold no usable sample")
    keys, rows, prompts = (list(column) for column in zip(*found))
    stacked = to_float(np.stack(rows)) if kind == "image" else torch.stack(rows)
    return HeldOut(stacked, prompts, keys, where, kind)


def usable_samples(urls: list[str], decode: Callable[[dict], tuple[Any, str]]
                   ) -> Iterator[tuple[str, Any, str]]:
    """(shard:key, row, prompt) of every sample of `urls` that decodes, in order."""
    for url in urls:
        with contextlib.closing(read_shard(url)) as reader:  # closes the file when cut short
            for item in reader:
                if isinstance(item, ShardIssue):
                    continue
                offset, example = item
                try:
                    row, prompt = decode(example)
                except BadSample:
                    continue
                yield f"{url.rsplit('/', 1)[-1]}:{example.get('__key__') or offset}", row, prompt


@torch.no_grad()
def build_val_set(cfg: Config, vae: nn.Module, device: torch.device, n: int | None = None,
                  source: str | None = None, vae_identity: str | None = None) -> ValSet:
    """The fixed validation set of the run `cfg` (`n`: its first n samples, default
    train.val_samples; `source`: held-out shards other than the run's), encoded by `vae` (the
    posterior mean, fp32) in batches of train.val_batch_size; latent shards must come from the
    VAE `vae_identity` names (see held_out)."""
    wanted = n or cfg.train.val_samples
    samples = held_out(cfg, wanted, source, vae_identity)
    if len(samples.keys) < wanted:  # the report's val_n says it too; say it once up front
        log.warning("the held-out shards (%s) hold %d usable sample(s), fewer than the %d asked "
                    "(%s): the validation loss averages over those", samples.source,
                    len(samples.keys), wanted, "--n" if n else "train.val_samples")
    b = cfg.train.val_batch_size
    posterior = (vae.encode if samples.kind == "image" else DiagonalGaussian.from_moments)
    latents = torch.cat([posterior(x.to(device)).mode() * vae.latent_scale
                         for x in samples.rows.split(b)]).float()  # (N, C, h, w)
    noise = torch.stack([torch.randn(latents.shape[1:],
                                     generator=rng.generator(VAL_SEED, "noise", i))
                         for i in range(len(latents))]).to(device)  # (N, C, h, w), CPU draws
    tokens = tokenize(samples.prompts, cfg.text.context_length).to(device)  # (N, L)
    return ValSet(latents=latents, tokens=tokens, noise=noise, keys=samples.keys, source=samples.source,
                  timesteps=val_timesteps(cfg.schedule.num_train_timesteps,
                                          cfg.train.val_timesteps).to(device))


@torch.no_grad()
def val_loss(unet: nn.Module, text: nn.Module, val_set: ValSet, cfg: Config,
             device: torch.device) -> dict[str, Any]:
    """The mean and per-timestep validation loss of `unet` with text tower `text` (pass the EMA
    weights) on `val_set`: mean over samples of ||target - unet(x_t, t, text)||^2 / dims at each
    grid timestep (float64 sums in a fixed order), then the mean over the grid. Networks run
    under train.precision's autocast (fp32 on the CPU)."""
    schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
    b, n = cfg.train.val_batch_size, len(val_set.latents)
    sums = torch.zeros(len(val_set.timesteps), dtype=torch.float64)
    with autocast(device, cfg.train.precision):
        states = [text(tokens)[0] for tokens in val_set.tokens.split(b)]  # (b, L, D) each
        for k, t in enumerate(val_set.timesteps):
            for i, start in enumerate(range(0, n, b)):
                x0 = val_set.latents[start:start + b]  # (b, C, h, w)
                eps = val_set.noise[start:start + b]
                tt = t.expand(len(x0))  # (b,)
                x_t = schedule.add_noise(x0, eps, tt)
                target = schedule.target(x0, eps, tt, cfg.schedule.prediction_type).float()
                pred = unet(x_t, tt, states[i]).float()
                sums[k] += ((pred - target) ** 2).mean(dim=(1, 2, 3)).double().sum().cpu()
    by_t = sums / n
    return {"val_loss": by_t.mean().item(), "val_loss_by_t": by_t.tolist(),
            "val_timesteps": val_set.timesteps.tolist(), "val_n": n}


def val_loss_suite(pipe: Any, source: str | None = None, n: int | None = None) -> dict[str, Any]:
    """`t2i-eval --suite val-loss`: the validation loss of a loaded Pipeline (its weights, EMA
    by default) on the run's validation set, or on the first `n` samples of the held-out shards
    `source`."""
    vae_file = pipe.source.parent.parent / "vae.safetensors"  # RUN/unet/ckpt-N -> RUN
    val_set = build_val_set(pipe.cfg, pipe.vae, pipe.device, n, source,
                            vae_sha256(vae_file) if vae_file.is_file() else None)
    result = val_loss(pipe.unet, pipe.text, val_set, pipe.cfg, pipe.device)
    return {"suite": "val-loss", "n": result["val_n"], "source": val_set.source, **result}
