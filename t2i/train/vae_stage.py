"""Stage 1 wired from a Config: train the KL autoencoder, measure the latent scale (1 / std of
latents) and write `RUN/vae.safetensors`; `load_vae` reads it back for stage 2, sampling and eval."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from t2i import rng
from t2i.config import Config, to_json
from t2i.data import build_loader
from t2i.models.io import load_into, load_weights, save_weights
from t2i.models.text import tokenize
from t2i.models.vae import VAE
from t2i.train import distributed
from t2i.train.env import (Env, commit_start, data_positions, loop_settings, make_loader,
                           maybe_compile, resolved_precision, restore, step_settings)
from t2i.train.loop import TrainingError, fit
from t2i.train.run import Run
from t2i.train.state import TrainState, ema_state_dict, init_train_state, lr_at
from t2i.train.step import VAEObjective, vae_train_step


def train_vae(cfg: Config, run: Run, env: Env) -> Path:
    vae = build_vae(cfg, env.device)
    state = init_train_state(vae, cfg.train.vae_lr, cfg.train.weight_decay, cfg.train.seed,
                             resolved_precision(cfg, env.device), env.device)
    state, position, counters = restore(state, run, "vae", env)
    loader = make_loader(cfg, env, position, "vae-data")
    commit_start(cfg, run, "vae", env, state.step)
    objective = distributed.wrap(VAEObjective(vae, cfg.train.recon_loss, cfg.train.kl_weight),
                                 env.world, env.device)
    compiled = maybe_compile(objective, cfg)
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    total = cfg.train.vae_steps
    settings = step_settings(cfg, env, cfg.train.vae_lr, total)
    train_step = functools.partial(vae_train_step, objective=compiled, settings=settings,
                                   latent_shape=(cfg.vae.z_channels, res // f, res // f),
                                   no_sync=distributed.no_sync_of(objective))
    state = fit(state, train_step, iter(loader), loop_settings(cfg, env, "vae", total), run,
                env.world, checkpoint_extra=lambda: data_positions(loader, env.world),
                checkpoint_metadata={"config": to_json(cfg), "stage": "vae"},
                lr_of=lambda s: lr_at(s, cfg.train.vae_lr, cfg.train.warmup_steps, total,
                                      cfg.train.lr_schedule),
                bad_samples=loader.stats, counters=counters)
    if env.world.is_main:
        export_vae(cfg, state, run, env)
    distributed.barrier(env.world)
    return run.vae_weights


def build_vae(cfg: Config, device: torch.device) -> VAE:
    with rng.seeded(cfg.train.seed, "init-vae"):
        return VAE(cfg.vae).to(device)


@torch.no_grad()
def measure_latent_scale(vae: VAE, cfg: Config, env: Env, batches: int = 8) -> float:
    """1 / std of posterior samples over fresh images (Rombach et al. 2022, sec. 4.3.2)."""
    loader = build_loader(cfg.data, batch_size=min(cfg.train.batch_size, 64), tokenize=tokenize,
                          seed=rng.derive_seed(cfg.train.seed, "latent-scale"),
                          reported=env.data_reports)
    it, samples = iter(loader), []
    for i in range(batches):
        images = next(it)["image"].to(env.device)
        samples.append(vae.encode(images).sample(rng.generator(cfg.train.seed, "scale", i,
                                                               device=env.device)).float())
    return 1.0 / torch.cat(samples).std().item()


def export_vae(cfg: Config, state: TrainState, run: Run, env: Env) -> None:
    """EMA weights into a fresh VAE, latent scale measured and stored, vae.safetensors written.

    Raises TrainingError, writing nothing, when a weight or the latent scale is not finite."""
    vae = VAE(cfg.vae).to(env.device)
    vae.load_state_dict(ema_state_dict(state))
    vae.latent_scale.fill_(measure_latent_scale(vae, cfg, env))
    refuse_nonfinite_export(vae, run.vae_weights)
    save_weights(run.vae_weights, vae.state_dict(),
                 {"config": to_json(cfg), "stage": "vae", "step": str(state.step),
                  "latent_scale": f"{vae.latent_scale.item():.8g}"})


def refuse_nonfinite_export(vae: VAE, path: Path) -> None:
    """Raises TrainingError naming `path` (not written) when the VAE to export holds NaN or inf
    in a weight or its latent scale (a diverged run: a nan std of the latents, or weights that
    overflowed)."""
    bad = [name for name, t in vae.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise TrainingError(
            f"vae: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} not finite "
            f"(latent_scale {vae.latent_scale.item():.6g}); {str(path)!r} was not written. The "
            "run diverged: lower --vae-lr, or check the data")


def load_vae(cfg: Config, path: Path, device: torch.device) -> VAE:
    """A trained VAE whose config must match cfg.vae. Raises WeightsError naming the file when
    it is missing, damaged or of another config."""
    weights, _ = load_weights(path)
    vae = VAE(cfg.vae)
    load_into(vae, weights, path)
    return vae.to(device).eval().requires_grad_(False)
