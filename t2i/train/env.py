"""What both training stages share: where they run (`Env`), the step and loop settings read
from a Config, the data loader, and the start of a stage (restore a checkpoint, then commit the
run folder)."""

from __future__ import annotations

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
from t2i.models.checkpoints import (clean_leftovers, damage, discard_newer, newest_intact,
                                    resolve_checkpoint)
from t2i.models.io import WeightsError, atomic_write, file_sha256
from t2i.models.vae_files import adopt_imported_vae
from t2i.models.vae_import import is_foreign
from t2i.models.text import tokenizer
from t2i.sample import autocast_dtype as sampling_autocast_dtype
from t2i.train import distributed
from t2i.train.checkpoint import load_checkpoint
from t2i.train.loop import LoopCounters, LoopSettings
from t2i.train.run import STAGES, Run
from t2i.train.state import TrainState
from t2i.train.step import StepSettings


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
    # called on the main rank by every commit_start, once the run folder holds config.json:
    # t2i-train prints its `run: FOLDER` line then, never for a start that failed
    on_start: Callable[[], None] | None = None


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


def make_loader(cfg: Config, env: Env, position: dict | None, seed_key: str,
                captions: bool = True):
    """The stage's training loader (build_loader; `captions` False for stage 1: images only)."""
    return build_loader(cfg.data, batch_size=per_rank_batch(cfg, env.world),
                        tokenize=tokenizer(cfg.text.context_length),
                        seed=rng.derive_seed(cfg.train.seed, seed_key),
                        rank=env.world.rank, world_size=env.world.world_size, position=position,
                        reported=env.data_reports, captions=captions)


def step_settings(cfg: Config, env: Env, stage: str, lr: float, total: int) -> StepSettings:
    return StepSettings(base_lr=lr, warmup_steps=cfg.train.warmup_steps, total_steps=total,
                        lr_schedule=cfg.train.lr_schedule, grad_clip=cfg.train.grad_clip,
                        grad_accum=cfg.train.grad_accum, ema_decay=cfg.train.ema_decay,
                        ema_warmup=cfg.init_from.stage != stage,
                        autocast_dtype=autocast_dtype(cfg, env.device), device=env.device,
                        rank=env.world.rank, world_size=env.world.world_size)


def loop_settings(cfg: Config, env: Env, stage: str, total: int) -> LoopSettings:
    return LoopSettings(stage=stage, total_steps=total, global_batch=cfg.train.batch_size,
                        log_every=env.log_every, sample_every=cfg.train.sample_every,
                        save_every=cfg.train.save_every, keep_last=cfg.train.keep_last,
                        max_nonfinite=cfg.train.max_nonfinite, show_progress=env.show_progress,
                        val_every=cfg.train.val_every)


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
    copy of --vae, and write config.json; then call `env.on_start`. A failed start or resume
    therefore changes nothing. Raises WeightsError when the run already holds another VAE than
    `vae_path`."""
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
    write_config_unless_done(cfg, run, stage, step)
    if env.on_start is not None:
        env.on_start()


def write_config_unless_done(cfg: Config, run: Run, stage: str, step: int) -> None:
    """Write `cfg` as RUN/config.json, unless the run has one and this resumed stage is already
    at its last step (`train.<stage>_steps`): it trains nothing, so changed settings would
    stick without ever being used (a warning says so; the next resume that trains saves them)."""
    if step < getattr(cfg.train, f"{stage}_steps") or not run.config_path.is_file():
        run.write_config(cfg)
    elif run.config_path.read_text() != to_json(cfg) + "\n":
        log.warning("the %s stage is at its last step (%d): nothing to train, so the changed "
                    "settings were not saved to %s (give more steps to train with them)",
                    stage, step, run.config_path)


def data_positions(loader, world: distributed.World) -> dict:
    """Checkpoint extra: every rank's data position (rank 0 writes them all)."""
    return {"data_positions": distributed.gather_objects(world, loader.position())}


def adopt_vae(source: Path, target: Path) -> None:
    """A run trained with `--vae PATH` keeps a copy as RUN/vae.safetensors (written atomically),
    so it samples and evaluates on its own; a foreign one (a diffusers folder, an LDM file) is
    written converted to t2i's format. Raises WeightsError when the run already holds a
    different VAE (its UNet was trained on that one) or the copy fails."""
    if source.resolve() == target.resolve():
        return
    if is_foreign(source):
        adopt_imported_vae(source, target)
        return
    if target.is_file():
        if file_sha256(target) != file_sha256(source):
            raise WeightsError(f"{str(target)!r} holds another VAE than --vae {str(source)!r}; "
                               "its UNet was trained on that one: use a new --out")
        return
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), source.stat().st_size)
