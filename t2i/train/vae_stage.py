"""Stage 1 wired from a Config: train the KL autoencoder (with the PatchGAN and LPIPS terms of
gan.py when vae.disc_weight or vae.lpips_weight is set), measure the latent scale (1 / std of
latents) and write `RUN/vae.safetensors`; `load_vae` reads it back for stage 2, sampling and eval."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from t2i import rng
from t2i.config import Config, to_json
from t2i.data import build_loader
from t2i.models.discriminator import PatchDiscriminator
from t2i.models.io import load_into, load_weights, save_weights
from t2i.models.lpips import load_lpips
from t2i.models.text import tokenize
from t2i.models.vae import VAE
from t2i.models.vae_files import (brings_architecture, check_vae_architecture, open_vae,
                                 with_architecture, with_vae_architecture)
from t2i.models.vae_import import empty_vae
from t2i.train import distributed
from t2i.train.env import (Env, commit_start, data_positions, loop_settings, make_loader,
                           maybe_compile, resolved_precision, restore, step_settings)
from t2i.train.init_from import initialize_from_parent
from t2i.train.init_vae import fine_tunes_vae_file
from t2i.train.loop import TrainingError, fit
from t2i.train.run import Run
from t2i.train.gan import Adversary, GANSettings, VAELossTerms, vae_gan_train_step
from t2i.train.state import TrainState, ema_state_dict, init_disc_state, init_train_state, lr_at
from t2i.train.step import StepSettings, VAEObjective, vae_train_step


def train_vae(cfg: Config, run: Run, env: Env) -> Path:
    vae = build_vae(cfg, env.device)
    lpips = load_lpips(cfg.vae.lpips_weights).to(env.device) if cfg.vae.lpips_weight > 0 else None
    state = init_train_state(vae, cfg.train.vae_lr, cfg.train.weight_decay, cfg.train.seed,
                             resolved_precision(cfg, env.device), env.device,
                             betas=tuple(cfg.train.vae_betas))
    state = with_discriminator(state, cfg, env.device)
    state, position, counters = restore(state, run, "vae", env)
    state = initialize_from_parent(state, cfg, "vae")  # --init-from; not when resumed
    loader = make_loader(cfg, env, position, "vae-data", captions=False)  # images only
    commit_start(cfg, run, "vae", env, state.step)
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    total = cfg.train.vae_steps
    settings = step_settings(cfg, env, "vae", cfg.train.vae_lr, total)
    latent_shape = (cfg.vae.z_channels, res // f, res // f)
    if cfg.vae.disc_weight > 0 or lpips is not None:
        train_step = gan_train_step(cfg, state, lpips, env, settings, latent_shape)
    else:
        objective = distributed.wrap(VAEObjective(vae, cfg.train.recon_loss, cfg.train.kl_weight),
                                     env.world, env.device)
        train_step = functools.partial(vae_train_step, objective=maybe_compile(objective, cfg),
                                       settings=settings, latent_shape=latent_shape,
                                       no_sync=distributed.no_sync_of(objective))
    state = fit(state, train_step, iter(loader), loop_settings(cfg, env, "vae", total), run,
                env.world, checkpoint_extra=lambda: data_positions(loader, env.world),
                checkpoint_metadata={"config": to_json(cfg), "stage": "vae"},
                lr_of=lambda s: lr_at(s, cfg.train.vae_lr, cfg.train.warmup_steps, total,
                                      cfg.train.lr_schedule),
                bad_samples=loader.stats, counters=counters)
    # rank 0 alone measures the latent scale and writes vae.safetensors; the other ranks wait
    # at the barrier, and stage 2 loads that file on every rank
    if env.world.is_main:
        export_vae(cfg, state, run, env)
    distributed.barrier(env.world)
    return run.vae_weights


def build_vae(cfg: Config, device: torch.device) -> VAE:
    """The stage-1 VAE at its seeded initialisation; with vae.freeze_encoder its encoder's
    parameters are set requires_grad False (in place), so the optimizer, the EMA and DDP hold
    the decoder's alone and the exported file keeps the encoder it started from."""
    with rng.seeded(cfg.train.seed, "init-vae"):
        vae = VAE(cfg.vae).to(device)
    if cfg.vae.freeze_encoder:
        vae.encoder.requires_grad_(False)
    return vae


def with_discriminator(state: TrainState, cfg: Config, device: torch.device) -> TrainState:
    """`state` with its PatchGAN discriminator's own TrainState (`state.disc`) when
    vae.disc_weight > 0: AdamW at vae.disc_lr (else train.vae_lr), betas (0.5, 0.9) and no
    weight decay, as LDM's Adam."""
    if cfg.vae.disc_weight <= 0:
        return state
    with rng.seeded(cfg.train.seed, "init-disc"):
        disc = PatchDiscriminator(cfg.vae.in_channels, cfg.vae.disc_channels,
                                  cfg.vae.disc_layers).to(device)
    return dataclasses.replace(state, disc=init_disc_state(
        disc, cfg.vae.disc_lr or cfg.train.vae_lr, 0.0, cfg.train.seed,
        resolved_precision(cfg, device), device))


def gan_train_step(cfg: Config, state: TrainState, lpips: torch.nn.Module | None, env: Env,
                   settings: StepSettings, latent_shape: tuple[int, int, int]):
    """`train_step(state, batch)` of gan.py for the VAE in `state.model`, the loss terms and the
    discriminator DDP-wrapped under torchrun. With train.compile the VAE's encoder and the
    decoder's blocks are compiled in place (`compile_vae_blocks`), not the whole objective."""
    vae = state.model
    if cfg.train.compile:
        compile_vae_blocks(vae)
    objective = distributed.wrap(VAELossTerms(vae, cfg.train.recon_loss, lpips), env.world,
                                 env.device)
    adversary = None
    if state.disc is not None:
        wrapped = distributed.wrap(state.disc.model, env.world, env.device)
        adversary = Adversary(forward=wrapped, module=state.disc.model,
                              no_sync=distributed.no_sync_of(wrapped),
                              last_layer=vae.decoder.conv_out.weight)
    gan = GANSettings(kl_weight=cfg.train.kl_weight, lpips_weight=cfg.vae.lpips_weight,
                      disc_weight=cfg.vae.disc_weight, disc_start=cfg.vae.disc_start,
                      disc_lr=cfg.vae.disc_lr or cfg.train.vae_lr, world=env.world)
    return functools.partial(vae_gan_train_step, objective=objective, settings=settings,
                             gan=gan, latent_shape=latent_shape, adversary=adversary,
                             no_sync=distributed.no_sync_of(objective))


def compile_vae_blocks(vae: VAE) -> None:
    """torch.compile the forward of the encoder and of the decoder's middle and up blocks, in
    place (`nn.Module.compile`: same parameters and state-dict keys). The decoder's last norm
    and convolution stay eager: the adaptive weight's `torch.autograd.grad` w.r.t. the last
    convolution then stops before any compiled region. Through one it would run that region's
    whole backward, and compiled backward graphs (with donated buffers) refuse the
    `retain_graph` it needs."""
    for module in (vae.encoder, vae.decoder.mid, vae.decoder.up):
        module.compile()


@torch.no_grad()
def measure_latent_scale(vae: VAE, cfg: Config, env: Env, batches: int = 8) -> float:
    """1 / std of posterior samples over fresh images (Rombach et al. 2022, sec. 4.3.2)."""
    loader = build_loader(cfg.data, batch_size=min(cfg.train.batch_size, 64), tokenize=tokenize,
                          seed=rng.derive_seed(cfg.train.seed, "latent-scale"),
                          reported=env.data_reports, captions=False)
    it, samples = iter(loader), []
    for i in range(batches):
        images = next(it)["image"].to(env.device)
        samples.append(vae.encode(images).sample(rng.generator(cfg.train.seed, "scale", i,
                                                               device=env.device)).float())
    return 1.0 / torch.cat(samples).std().item()


def export_vae(cfg: Config, state: TrainState, run: Run, env: Env) -> None:
    """EMA weights into a fresh VAE, latent scale measured and stored, vae.safetensors written.
    A fine-tuned VAE file (`--init-from FILE`) keeps the file's latent scale, so a UNet trained
    on its latents still fits (as sd-vae-ft-mse kept SD's 0.18215).

    Raises TrainingError, writing nothing, when a weight or the latent scale is not finite."""
    vae = VAE(cfg.vae).to(env.device)
    vae.load_state_dict(ema_state_dict(state))
    if not fine_tunes_vae_file(cfg):  # the file's latent scale is kept (init_vae.py)
        vae.latent_scale.fill_(measure_latent_scale(vae, cfg, env))
    refuse_nonfinite_export(vae, run.vae_weights)
    save_weights(run.vae_weights, vae.state_dict(),
                 {"config": to_json(cfg), "stage": "vae", "step": str(state.step),
                  # the shortest text of the float32 value: SD's 0.18215 stays "0.18215"
                  "latent_scale": str(vae.latent_scale.cpu().numpy())})


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
    """A trained VAE whose architecture must be cfg.vae's (check_vae_architecture). An imported one (a diffusers folder, an
    LDM file, or their conversion: `brings_architecture`) brings its own architecture instead,
    and keeps cfg.vae's other fields; `with_vae_of` then makes the run's config agree. Raises
    WeightsError naming the file when it is missing, damaged, of another config or cannot be
    imported."""
    if brings_architecture(path):
        imported = open_vae(path)
        vae = empty_vae(with_architecture(cfg.vae, imported.cfg))
        load_into(vae, imported.state_dict(), path)
        return vae.to(device).eval().requires_grad_(False)
    weights, metadata = load_weights(path)
    if "config" in metadata:  # a t2i file: its architecture must be cfg's
        check_vae_architecture(cfg, Path(path), metadata, "this run")
    vae = VAE(cfg.vae)
    load_into(vae, weights, path)
    return vae.to(device).eval().requires_grad_(False)


def with_vae_of(cfg: Config, vae: VAE) -> Config:
    """The run's config for stage 2 on `vae` (from load_vae): cfg itself for a t2i-trained VAE;
    for an imported one, cfg with vae = its config and the UNet's in/out channels = its
    z_channels, so config.json, checkpoints and sampling build the VAE that was imported.
    Raises ConfigError when that config is not valid (e.g. data.resolution is no multiple of
    the imported VAE's factor x the UNet's downsampling)."""
    return with_vae_architecture(cfg, vae.cfg)
