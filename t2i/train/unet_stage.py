"""Stage 2 wired from a Config: train the UNet (and the text tower when it is not frozen) on
latents of the frozen VAE.

The latents come from the VAE encoder in the step (images), from the `--cache-latents` cache
(latents.py), or from latent shards (`data.source` a `t2i-data encode` folder: the batches
carry the stored posterior moments, no image is decoded and no encoder runs). All three draw
the sample the same way, `reparameterise`, with the step's own eps_z: from latent shards
stored in fp32 the step computes exactly what it computes online. Latent shards are refused
(one line) for stage 1, when their manifest's VAE is not the run's VAE (sha256 of the file),
and when their z channels or factor are not the config's; the loader refuses a missing or
unreadable manifest and one without `data.resolution` (see t2i/data/loader.py).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from t2i import rng
from t2i.config import Config, ConfigError, check_text_training, to_json
from t2i.data.latent_shards import LatentManifest, manifest_path
from t2i.data.loader import latent_folder, latent_manifest
from t2i.models.checkpoints import latest_checkpoint
from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference, run_tower, save_tower
from t2i.models.io import WeightsError
from t2i.models.text import TextEncoder, build_text_encoder, tokenize
from t2i.models.unet import UNet
from t2i.models.vae import VAE, DiagonalGaussian
from t2i.models.vae_files import brings_architecture, vae_sha256
from t2i.schedulers import NoiseSchedule
from t2i.train import distributed
from t2i.train.env import (Env, commit_start, data_positions, loop_settings, make_loader,
                           maybe_compile, resolved_precision, restore, step_settings)
from t2i.train.grids import training_grid_prompts, write_sample_grid
from t2i.train.init_from import initialize_from_parent
from t2i.train.init_tower import adopted_tower, check_parent_tower, tower_stored
from t2i.train.latents import LatentCache, cache_identity, sample_keys
from t2i.train.loop import fit
from t2i.train.run import Run
from t2i.train.state import init_train_state, lr_at
from t2i.train.step import DiffusionObjective, diffusion_train_step
from t2i.train.val_hook import validation_hook
from t2i.train.vae_stage import load_vae, with_vae_of

log = logging.getLogger("t2i.train")
Encode = Callable[[dict, torch.Tensor], torch.Tensor]


def build_diffusion_model(cfg: Config, device: torch.device, text: TextEncoder | None = None,
                          text_weights: bool = True) -> nn.ModuleDict:
    """ModuleDict(unet=..., text=...); the text tower's parameters are frozen when configured.
    `text`: the tower to use (a run's frozen tower, `run_tower`), else built from cfg.text,
    with its source's weights unless `text_weights` is False (its architecture alone, seeded
    init: a checkpoint's weights follow)."""
    with rng.seeded(cfg.train.seed, "init-unet"):
        unet = UNet(cfg.unet)
        text = (build_text_encoder(cfg.text, load_weights=text_weights) if text is None
                else text)
    if cfg.text.frozen:
        text.requires_grad_(False)
    elif text.text_projection is not None:  # the pooled vector feeds no loss; under DDP every
        text.text_projection.requires_grad_(False)  # trainable parameter must get a gradient
    return nn.ModuleDict({"unet": unet, "text": text}).to(device)


def trained_modules(model: nn.ModuleDict, cfg: Config) -> nn.ModuleDict:
    """What stage 2 trains, and so what its TrainState, optimizer, EMA and checkpoints hold:
    the UNet, and the text tower unless it is frozen (a frozen tower never changes: the run
    stores it once, RUN/text.safetensors, see t2i/models/frozen_text.py)."""
    return nn.ModuleDict({"unet": model["unet"]}) if cfg.text.frozen else model


def train_diffusion(cfg: Config, run: Run, env: Env, vae_path: Path) -> Path:
    check_text_training(cfg.text)  # ConfigError: a frozen random tower
    latents = latent_source(cfg, vae_path)  # None: images, encoded in the step
    try:
        vae = load_vae(cfg, vae_path, env.device)
    except WeightsError as err:
        raise WeightsError(f"{err}{vae_repair_hint(cfg, run, vae_path)}") from err
    if latents is not None:  # after load_vae: a file that is no VAE is named as such
        check_encoder(latents, cfg, vae_path)
    cfg = with_vae_of(cfg, vae)  # an imported VAE brings its architecture into the run
    tower = frozen_tower(cfg, run) if cfg.text.frozen else None
    # a trained tower whose weights a checkpoint brings (a resume, a stage-2 parent) is built
    # without its source: the open_clip tag or text.weights file may be gone
    model = build_diffusion_model(cfg, env.device, text=tower[0] if tower else None,
                                  text_weights=not tower_stored(cfg, run))
    state = init_train_state(trained_modules(model, cfg), cfg.train.unet_lr,
                             cfg.train.weight_decay, cfg.train.seed,
                             resolved_precision(cfg, env.device), env.device)
    state, position, counters = restore(state, run, "unet", env)
    state = initialize_from_parent(state, cfg, "unet")  # --init-from; not when resumed
    loader = make_loader(cfg, env, position, "unet-data")
    commit_start(cfg, run, "unet", env, state.step, vae_path)
    metadata = {"config": to_json(cfg), "stage": "unet"}
    if tower is not None:
        metadata[METADATA_KEY] = keep_tower(run, env, *tower).to_json()
    schedule = NoiseSchedule.from_config(cfg.schedule).to(env.device)  # no copy per add_noise
    frozen_text = cfg.text.frozen
    objective = distributed.wrap(
        DiffusionObjective(model["unet"], None if frozen_text else model["text"], schedule,
                           cfg.schedule.prediction_type, cfg.train.snr_gamma,
                           cfg.train.snr_floor),
        env.world, env.device)
    compiled = maybe_compile(objective, cfg)
    cache = latent_cache(cfg, run, env, vae_path, latents)
    encode = (latent_encoder(vae, env.device, cache) if latents is None
              else stored_latents(vae, env.device))

    text_input = text_input_fn(cfg, model["text"], env.device)
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    total = cfg.train.unet_steps
    settings = step_settings(cfg, env, "unet", cfg.train.unet_lr, total)
    train_step = functools.partial(
        diffusion_train_step, objective=compiled, settings=settings, encode=encode,
        text_input=text_input, latent_shape=(cfg.vae.z_channels, res // f, res // f),
        num_train_timesteps=cfg.schedule.num_train_timesteps, cond_drop=cfg.train.cond_drop,
        no_sync=distributed.no_sync_of(objective))
    prompts = training_grid_prompts(cfg)
    state = fit(state, train_step, iter(loader), loop_settings(cfg, env, "unet", total), run,
                env.world, checkpoint_extra=lambda: unet_extra(loader, env.world, cache),
                checkpoint_metadata=metadata,
                lr_of=lambda s: lr_at(s, cfg.train.unet_lr, cfg.train.warmup_steps, total,
                                      cfg.train.lr_schedule),
                on_sample=lambda st: write_sample_grid(st, vae, cfg, run, prompts, env.device,
                                                       text=model["text"]),
                on_validate=validation_hook(cfg, state, vae, env, text=model["text"],
                                            vae_path=vae_path),
                bad_samples=loader.stats, counters=counters)
    return run.stage_dir("unet")


def frozen_tower(cfg: Config, run: Run) -> tuple[TextEncoder, TowerReference, bool]:
    """(encoder, reference, still to be written to the run) of the frozen tower (run_tower):
    the run's own copy on a resume; for a --init-from child without one, its parent's stored
    copy when the config names the parent's tower, and never other weights than the
    parent's (t2i/train/init_tower.py). Raises WeightsError, TextWeightsError."""
    own = (run.dir / TOWER_FILE).is_file()
    parent = None if own else adopted_tower(cfg)
    with rng.seeded(cfg.train.seed, "init-text"):  # module init draws; weights loaded after
        tower = run_tower(run.dir, cfg.text, parent)
    if parent is not None:
        log.info("text tower %s: the --init-from parent's stored copy %s", parent[1].describe(),
                 parent[0])
    if not own:
        check_parent_tower(cfg, tower[1])
    return tower


def keep_tower(run: Run, env: Env, text: TextEncoder, reference: TowerReference,
               unsaved: bool) -> TowerReference:
    """Write the frozen tower once per run, RUN/text.safetensors (main rank, atomically), when
    the run has no copy yet; every checkpoint then names it by `reference` instead of holding
    it. Raises WeightsError when the write fails."""
    if unsaved and env.world.is_main:
        save_tower(run.dir / TOWER_FILE, text, reference)
        log.info("text tower %s stored once for the run: %s", reference.describe(),
                 run.dir / TOWER_FILE)
    return reference


def vae_repair_hint(cfg: Config, run: Run, vae_path: Path) -> str:
    """How to get back a damaged RUN/vae.safetensors that this run's stage 1 exported: deleting
    it makes a resume export it again from stage 1's last checkpoint (see `train`)."""
    own = vae_path.resolve() == run.vae_weights.resolve()
    if own and cfg.train.stage == "all" and latest_checkpoint(run.stage_dir("vae")) is not None:
        return ("; delete it and resume: it is exported again from stage 1's last checkpoint "
                f"(rm {run.vae_weights}; t2i-train --resume {run.dir})")
    return ""


def check_latent_stage(cfg: Config) -> None:
    """Latent shards feed stage 2 only. Raises ConfigError when `cfg.data.source` is a
    latent-shard folder and train.stage is not "unet" (DataError when that folder is one item
    of a list)."""
    folder = latent_folder(cfg.data.source)
    if folder is not None and cfg.train.stage != "unet":
        raise ConfigError(f"data source {folder!r} holds latent shards, which train stage 2 "
                          f"only (now train.stage={cfg.train.stage}): pass --stage unet and "
                          f"--vae with the VAE that encoded them")


def latent_source(cfg: Config, vae_path: Path) -> LatentManifest | None:
    """The manifest when stage 2 trains from latent shards (None for images), checked against
    the run's config (the VAE itself: check_encoder). Raises DataError (see
    loader.latent_manifest), ConfigError when their z channels or downsample factor are not the
    config's VAE's (an imported VAE brings its own, see with_vae_of)."""
    manifest = latent_manifest(cfg.data)
    if manifest is None:
        return None
    where = str(manifest_path(cfg.data.source))
    made = (manifest.z_channels, manifest.downsample_factor)
    if not brings_architecture(vae_path) and made != (cfg.vae.z_channels,
                                                      cfg.vae.downsample_factor):
        raise ConfigError(f"{where!r} holds latents of a VAE with z_channels={made[0]}, "
                          f"downsample factor {made[1]}; the config's VAE has vae.z_channels="
                          f"{cfg.vae.z_channels}, factor {cfg.vae.downsample_factor}: train "
                          f"with the config of the VAE that encoded them")
    return manifest


def check_encoder(manifest: LatentManifest, cfg: Config, vae_path: Path) -> None:
    """Raises WeightsError when another VAE than `vae_path` encoded the latent shards
    (vae_sha256: the file's sha256, an imported VAE's source files')."""
    digest = vae_sha256(vae_path)
    if digest != manifest.vae_sha256:
        raise WeightsError(f"{str(manifest_path(cfg.data.source))!r} was encoded by another VAE "
                           f"(sha256 {manifest.vae_sha256[:16]}...) than this run's "
                           f"{str(vae_path)!r} (sha256 {digest[:16]}...): pass --vae with the "
                           f"VAE that encoded them, or encode them again with this one")


def latent_cache(cfg: Config, run: Run, env: Env, vae_path: Path,
                 latents: LatentManifest | None = None) -> LatentCache | None:
    """The --cache-latents cache of this rank (see latents.py), or None when off or when
    training from latent shards (nothing is encoded then)."""
    if not cfg.train.cache_latents:
        return None
    if latents is not None:
        if env.world.is_main:
            log.warning("--cache-latents does nothing with latent shards (their moments are "
                        "read from disk): ignored")
        return None
    identity = cache_identity(vae_path, cfg.data, rng.derive_seed(cfg.train.seed, "unet-data"),
                              cfg.train.batch_size, resolved_precision(cfg, env.device))
    return LatentCache(run.dir / "latents", identity, env.world.rank)


def reparameterise(mean: torch.Tensor, logvar: torch.Tensor, eps_z: torch.Tensor,
                   latent_scale: torch.Tensor) -> torch.Tensor:
    """The scaled latent sample (mean + exp(logvar / 2) * eps_z) * latent_scale, (B, z, h, w)
    (Kingma & Welling 2014, eq. 10; the scale of Rombach et al. 2022, sec. 4.3.2)."""
    return (mean + torch.exp(0.5 * logvar) * eps_z) * latent_scale


def stored_latents(vae: VAE, device: torch.device) -> Encode:
    """encode(batch, eps_z) for batches from latent shards: their stored moments (B, 2z, h, w)
    read as the VAE reads its own (DiagonalGaussian.from_moments), sampled with the step's
    eps_z and scaled by this VAE's latent_scale (the manifest's VAE: checked by sha256)."""
    @torch.no_grad()
    def encode(batch: dict, eps_z: torch.Tensor) -> torch.Tensor:
        post = DiagonalGaussian.from_moments(batch["moments"].to(device, non_blocking=True))
        return reparameterise(post.mean, post.logvar, eps_z, vae.latent_scale)

    return encode


def latent_encoder(vae: VAE, device: torch.device, cache: LatentCache | None) -> Encode:
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
        return reparameterise(mean, logvar, eps_z, vae.latent_scale)

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
    """The VAE stage 2 trains on: --vae PATH (a t2i file, a run folder, a diffusers folder or
    an LDM file), else the run's own. Raises WeightsError when there is none."""
    path = Path(vae_path) if vae_path else run.vae_weights
    if path.is_dir():  # a run folder (its vae.safetensors) or a diffusers AutoencoderKL folder
        return path / "vae.safetensors" if (path / "vae.safetensors").is_file() else path
    if path.is_file():
        return path
    where = (f"at {str(path)!r}" if vae_path or run.holds_run()
             else "(stage 2 alone, and no --vae)")  # a new run's folder is no place to look
    if latent_folder(cfg.data.source) is not None:
        raise WeightsError(f"no VAE {where}: training from latent shards needs the VAE that "
                           f"encoded them: pass --vae PATH")
    raise WeightsError(f"no trained VAE {where}: train stage 1 first (--stage vae or all) or "
                       f"pass --vae PATH")
