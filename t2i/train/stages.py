"""The two training stages wired from a Config: models, data, step, checkpoints, export.

Stage 1 (`train_vae`) trains the KL autoencoder, then measures the latent scale (1 / std of
latents) and writes `RUN/vae.safetensors`. Stage 2 (`train_diffusion`) trains the UNet (and the
text tower when it is not frozen) on latents of the frozen VAE.
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from t2i import rng
from t2i.config import Config, ConfigError, to_json
from t2i.data import build_loader
from t2i.models.text import build_text_encoder, tokenize, tokenizer
from t2i.models.unet import UNet
from t2i.models.vae import VAE
from t2i.schedulers import NoiseSchedule
from t2i.train import distributed
from t2i.models.checkpoints import (clean_leftovers, damage, discard_newer, latest_checkpoint,
                                    newest_intact, resolve_checkpoint)
from t2i.models.io import (WeightsError, atomic_write, file_sha256, load_into, load_weights,
                           save_weights)
from t2i.train.checkpoint import load_checkpoint
from t2i.sample import autocast_dtype as sampling_autocast_dtype
from t2i.train.grids import training_grid_prompts, write_sample_grid
from t2i.train.latents import LatentCache, cache_identity, sample_keys
from t2i.train.loop import LoopCounters, LoopSettings, TrainingError, fit
from t2i.train.run import STAGES, Run
from t2i.train.state import TrainState, ema_state_dict, init_train_state, lr_at
from t2i.train.step import (DiffusionObjective, StepSettings, VAEObjective,
                            diffusion_train_step, vae_train_step)


@dataclass(frozen=True)
class Env:
    """Where and how a stage runs (not part of the reproducible config)."""

    device: torch.device
    world: distributed.World
    resume: bool
    show_progress: bool = True
    log_every: int = 10
    resume_from: Path | None = None  # the checkpoint folder named with --resume, if one was
    # what the run's data loaders logged already (empty or cut shards): once per run, not once
    # per loader (see build_loader)
    data_reports: set = field(default_factory=set)


log = logging.getLogger("t2i.train")


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The training step's autocast dtype: `train.precision` read as sampling reads
    `--precision` (`auto`: bf16 on CUDA, fp32 elsewhere)."""
    return sampling_autocast_dtype(device, cfg.train.precision)


def resolved_precision(cfg: Config, device: torch.device) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[autocast_dtype(cfg, device)]


def maybe_compile(module: nn.Module, cfg: Config) -> nn.Module:
    return torch.compile(module) if cfg.train.compile else module


def per_rank_batch(cfg: Config, world: distributed.World) -> int:
    b, k, n = cfg.train.batch_size, cfg.train.grad_accum, world.world_size
    if b % (k * n):
        raise ConfigError(f"--batch-size {b} must be divisible by --grad-accum {k} x world "
                          f"size {n}")
    return b // n


def make_loader(cfg: Config, env: Env, position: dict | None, seed_key: str):
    return build_loader(cfg.data, batch_size=per_rank_batch(cfg, env.world),
                        tokenize=tokenizer(cfg.text.context_length),
                        seed=rng.derive_seed(cfg.train.seed, seed_key),
                        rank=env.world.rank, world_size=env.world.world_size, position=position,
                        reported=env.data_reports)


def step_settings(cfg: Config, env: Env, lr: float, total: int) -> StepSettings:
    return StepSettings(base_lr=lr, warmup_steps=cfg.train.warmup_steps, total_steps=total,
                        lr_schedule=cfg.train.lr_schedule, grad_clip=cfg.train.grad_clip,
                        grad_accum=cfg.train.grad_accum, ema_decay=cfg.train.ema_decay,
                        autocast_dtype=autocast_dtype(cfg, env.device), device=env.device,
                        rank=env.world.rank, world_size=env.world.world_size)


def loop_settings(cfg: Config, env: Env, stage: str, total: int) -> LoopSettings:
    return LoopSettings(stage=stage, total_steps=total, global_batch=cfg.train.batch_size,
                        log_every=env.log_every, sample_every=cfg.train.sample_every,
                        save_every=cfg.train.save_every, keep_last=cfg.train.keep_last,
                        max_nonfinite=cfg.train.max_nonfinite, show_progress=env.show_progress)


def restore(state: TrainState, run: Run, stage: str, env: Env
            ) -> tuple[TrainState, dict | None, LoopCounters]:
    """Continue from the stage's checkpoint when resuming (see resume_checkpoint); returns the
    data position and the loop's counters (consecutive non-finite steps survive a resume).
    Raises WeightsError when the checkpoint is damaged or does not fit the config."""
    ckpt = resume_checkpoint(run, stage, env)
    if ckpt is None:
        return state, None, LoopCounters()
    state, extra = load_checkpoint(ckpt, state, hashed=False)  # resume_checkpoint hashed it
    positions = extra.get("data_positions") or [extra.get("data_position")]
    if len(positions) != env.world.world_size:
        raise WeightsError(f"{ckpt} was saved by {len(positions)} process(es), now "
                           f"{env.world.world_size}: resume with the same torchrun layout")
    return state, positions[env.world.rank], LoopCounters.from_extra(extra)


def resume_checkpoint(run: Run, stage: str, env: Env) -> Path | None:
    """The checkpoint a stage continues from: None when not resuming or the stage has none yet;
    the one named with --resume when it is of this stage; else the newest intact one, newer
    damaged ones skipped with a message naming them. Raises WeightsError when the named one is
    damaged, or when every checkpoint of the stage is."""
    stage_dir = run.stage_dir(stage)
    if not env.resume:
        return None
    named = named_checkpoint(stage_dir, env)
    if named is not None:
        resolve_checkpoint(named)  # incomplete: an error
        reason = damage(named)
        if reason is not None:
            raise WeightsError(f"cannot resume from {str(named)!r}: {reason}")
        return named
    ckpt, skipped = newest_intact(stage_dir)
    if skipped and ckpt is None:
        raise WeightsError(f"no intact checkpoint in {str(stage_dir)!r}: {'; '.join(skipped)}")
    if skipped and env.world.is_main:
        log.warning("skipping damaged checkpoint(s): %s; resuming from %s",
                    "; ".join(skipped), ckpt)
    return ckpt


def named_checkpoint(stage_dir: Path, env: Env) -> Path | None:
    """The checkpoint folder named with `--resume RUN/<stage>/ckpt-N`, if it is one of
    `stage_dir`'s."""
    named = env.resume_from if env.resume else None
    return named if named is not None and named.parent.resolve() == stage_dir.resolve() else None


def commit_start(cfg: Config, run: Run, stage: str, env: Env, step: int,
                 vae_path: Path | None = None) -> None:
    """A stage's setup succeeded (checkpoint restored, data position accepted): only now change
    the run folder (main rank): remove leftovers of killed processes (in every stage folder),
    drop the checkpoints after a --resume-named one, cut metrics.jsonl back to `step`, keep a
    copy of --vae, and write config.json. A failed start or resume therefore changes nothing. Raises WeightsError when
    the run already holds another VAE than `vae_path`."""
    if not env.world.is_main:
        return
    stage_dir = run.stage_dir(stage)
    if vae_path is not None:
        adopt_vae(vae_path, run.vae_weights)
    for folder in (run.stage_dir(s) for s in STAGES):  # every stage's, not only this one's
        removed = clean_leftovers(folder)
        if removed:
            log.warning("removed leftovers of an interrupted run in %s: %s", folder,
                        ", ".join(removed))
    named = named_checkpoint(stage_dir, env)
    if named is not None:
        dropped = discard_newer(stage_dir, named)
        if dropped:
            log.warning("resuming from %s: removed the later checkpoint(s) %s", named.name,
                        ", ".join(p.name for p in dropped))
    run.cut_metrics(stage, step)
    run.write_config(cfg)


def data_positions(loader, world: distributed.World) -> dict:
    """Checkpoint extra: every rank's data position (rank 0 writes them all)."""
    return {"data_positions": distributed.gather_objects(world, loader.position())}


# ----------------------------------------------------------------------------------------------
# Stage 1
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Stage 2
# ----------------------------------------------------------------------------------------------


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


def adopt_vae(source: Path, target: Path) -> None:
    """A run trained with `--vae PATH` keeps a copy as RUN/vae.safetensors (written atomically),
    so it samples and evaluates on its own. Raises WeightsError when the run already holds a
    different VAE (its UNet was trained on that one) or the copy fails."""
    if source.resolve() == target.resolve():
        return
    if target.is_file():
        if file_sha256(target) != file_sha256(source):
            raise WeightsError(f"{str(target)!r} holds another VAE than --vae {str(source)!r}; "
                               "its UNet was trained on that one: use a new --out")
        return
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), source.stat().st_size)


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


def train(cfg: Config, run: Run, env: Env, vae_path: str | None = None) -> None:
    """Run the configured stage(s); a finished stage 1 is not redone on resume."""
    if cfg.train.stage in ("vae", "all") and not (env.resume and run.vae_weights.is_file()
                                                    and cfg.train.stage == "all") and not vae_path:
        train_vae(cfg, run, env)
    if cfg.train.stage in ("unet", "all"):
        train_diffusion(cfg, run, env, require_vae(cfg, run, vae_path))
