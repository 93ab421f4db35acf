"""Stage 2 wired from a Config: train the UNet (and the text tower when it is not frozen) on
latents of the frozen VAE."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from t2i import rng
from t2i.config import Config, to_json
from t2i.models.checkpoints import latest_checkpoint
from t2i.models.io import WeightsError
from t2i.models.text import build_text_encoder, tokenize
from t2i.models.unet import UNet
from t2i.models.vae import VAE
from t2i.schedulers import NoiseSchedule
from t2i.train import distributed
from t2i.train.env import (Env, commit_start, data_positions, loop_settings, make_loader,
                           maybe_compile, resolved_precision, restore, step_settings)
from t2i.train.grids import training_grid_prompts, write_sample_grid
from t2i.train.latents import LatentCache, cache_identity, sample_keys
from t2i.train.loop import fit
from t2i.train.run import Run
from t2i.train.state import init_train_state, lr_at
from t2i.train.step import DiffusionObjective, diffusion_train_step
from t2i.train.vae_stage import load_vae


def build_diffusion_model(cfg: Config, device: torch.device) -> nn.ModuleDict:
    """ModuleDict(unet=..., text=...); the text tower's parameters are frozen when configured."""
    with rng.seeded(cfg.train.seed, "init-unet"):
        unet = UNet(cfg.unet)
        text = build_text_encoder(cfg.text)
    if cfg.text.frozen:
        text.requires_grad_(False)
    elif text.text_projection is not None:  # the pooled vector feeds no loss; under DDP every
        text.text_projection.requires_grad_(False)  # trainable parameter must get a gradient
    return nn.ModuleDict({"unet": unet, "text": text}).to(device)


def train_diffusion(cfg: Config, run: Run, env: Env, vae_path: Path) -> Path:
    try:
        vae = load_vae(cfg, vae_path, env.device)
    except WeightsError as err:
        raise WeightsError(f"{err}{vae_repair_hint(cfg, run, vae_path)}") from err
    model = build_diffusion_model(cfg, env.device)
    state = init_train_state(model, cfg.train.unet_lr, cfg.train.weight_decay, cfg.train.seed,
                             resolved_precision(cfg, env.device), env.device)
    state, position, counters = restore(state, run, "unet", env)
    loader = make_loader(cfg, env, position, "unet-data")
    commit_start(cfg, run, "unet", env, state.step, vae_path)
    schedule = NoiseSchedule.from_config(cfg.schedule).to(env.device)  # no copy per add_noise
    frozen_text = cfg.text.frozen
    objective = distributed.wrap(
        DiffusionObjective(model["unet"], None if frozen_text else model["text"], schedule,
                           cfg.schedule.prediction_type, cfg.train.snr_gamma,
                           cfg.train.snr_floor),
        env.world, env.device)
    compiled = maybe_compile(objective, cfg)
    cache = latent_cache(cfg, run, env, vae_path)
    encode = latent_encoder(vae, env.device, cache)

    text_input = text_input_fn(cfg, model["text"], env.device)
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    total = cfg.train.unet_steps
    settings = step_settings(cfg, env, cfg.train.unet_lr, total)
    train_step = functools.partial(
        diffusion_train_step, objective=compiled, settings=settings, encode=encode,
        text_input=text_input, latent_shape=(cfg.vae.z_channels, res // f, res // f),
        num_train_timesteps=cfg.schedule.num_train_timesteps, cond_drop=cfg.train.cond_drop,
        no_sync=distributed.no_sync_of(objective))
    prompts = training_grid_prompts(cfg)
    state = fit(state, train_step, iter(loader), loop_settings(cfg, env, "unet", total), run,
                env.world, checkpoint_extra=lambda: unet_extra(loader, env.world, cache),
                checkpoint_metadata={"config": to_json(cfg), "stage": "unet"},
                lr_of=lambda s: lr_at(s, cfg.train.unet_lr, cfg.train.warmup_steps, total,
                                      cfg.train.lr_schedule),
                on_sample=lambda st: write_sample_grid(st, vae, cfg, run, prompts, env.device),
                bad_samples=loader.stats, counters=counters)
    return run.stage_dir("unet")


def vae_repair_hint(cfg: Config, run: Run, vae_path: Path) -> str:
    """How to get back a damaged RUN/vae.safetensors that this run's stage 1 exported: deleting
    it makes a resume export it again from stage 1's last checkpoint (see `train`)."""
    own = vae_path.resolve() == run.vae_weights.resolve()
    if own and cfg.train.stage == "all" and latest_checkpoint(run.stage_dir("vae")) is not None:
        return ("; delete it and resume: it is exported again from stage 1's last checkpoint "
                f"(rm {run.vae_weights}; t2i-train --resume {run.dir})")
    return ""


def latent_cache(cfg: Config, run: Run, env: Env, vae_path: Path) -> LatentCache | None:
    """The --cache-latents cache of this rank (see latents.py), or None when off."""
    if not cfg.train.cache_latents:
        return None
    identity = cache_identity(vae_path, cfg.data, rng.derive_seed(cfg.train.seed, "unet-data"),
                              cfg.train.batch_size)
    return LatentCache(run.dir / "latents", identity, env.world.rank)


def latent_encoder(vae: VAE, device: torch.device, cache: LatentCache | None
                   ) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """encode(batch, eps_z) -> scaled latents: posterior moments from the frozen VAE (or the
    cache) and the reparameterised sample mean + sigma * eps_z drawn by the step. With a cache,
    each call adds the moments of unseen keys to it and counts hits and misses (in place: the
    one change a step makes outside TrainState, listed in state.py)."""
    def moments(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        post = vae.encode(images)
        return post.mean, post.logvar

    @torch.no_grad()
    def encode(batch: dict, eps_z: torch.Tensor) -> torch.Tensor:
        images = batch["image"].to(device, non_blocking=True)
        mean, logvar = (moments(images) if cache is None
                        else cache.moments(sample_keys(batch), images, moments))
        return (mean + torch.exp(0.5 * logvar) * eps_z) * vae.latent_scale

    return encode


def unet_extra(loader, world: distributed.World, cache: LatentCache | None) -> dict:
    """At a checkpoint: write the latent cache (each rank its own file), gather data positions."""
    if cache is not None:
        cache.save()
    return data_positions(loader, world)


def text_input_fn(cfg: Config, text: nn.Module, device: torch.device
                  ) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """`text_input(batch, drop)` for diffusion_train_step: the batch's tokens with dropped rows
    replaced by the empty prompt; encoded here (no grad) when the text tower is frozen, else
    left to the objective, which trains the tower."""
    empty = tokenize([""], cfg.text.context_length).to(device)  # (1, L): unconditional

    def text_input(batch: dict, drop: torch.Tensor) -> torch.Tensor:
        tokens = batch["tokens"].to(device, non_blocking=True)  # pinned by the loader on CUDA
        tokens = torch.where(drop[:, None], empty, tokens)  # (B, L)
        if not cfg.text.frozen:
            return tokens
        with torch.no_grad():
            return text(tokens)[0]

    return text_input



def require_vae(cfg: Config, run: Run, vae_path: str | None) -> Path:
    """The VAE stage 2 trains on: --vae PATH, else the run's own. Raises WeightsError when
    there is none."""
    path = Path(vae_path) if vae_path else run.vae_weights
    if not path.is_file():
        raise WeightsError(f"no trained VAE at {str(path)!r}: train stage 1 first "
                           f"(--stage vae or all) or pass --vae PATH")
    return path
