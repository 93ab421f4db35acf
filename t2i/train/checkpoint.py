"""Trainer checkpoints: what a TrainState stores in a checkpoint folder, and how it comes back.

The folder layout, atomic writes, sha256 manifests, retention and damage checks live in
`t2i.models.checkpoints`; this module packs a trainer on top of it: the weights, the EMA
weights, and in trainer.pt the optimizer, the GradScaler, step, seed and the caller's extras
(data positions, counters). A stage-1 state with a discriminator (`state.disc`, see gan.py)
adds `disc.safetensors` and, in trainer.pt, "disc": its optimizer and GradScaler. No global
RNG state is saved or restored: every random draw in training derives from (seed, step, rank).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from t2i.models.checkpoints import (CheckpointData, latest_checkpoint, read_checkpoint,
                                    write_checkpoint)
from t2i.models.io import WeightsError, check_compatible, clean_key, load_into
from t2i.train.state import TrainState, ema_state_dict

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]  # latest: for the loop

DISC_FILE = "disc.safetensors"


def save_checkpoint(stage_dir: Path, state: TrainState, extra: dict[str, Any],
                    metadata: dict[str, str], keep_last: int) -> Path:
    """Write checkpoint `ckpt-{step}` of `state` plus `extra` (see write_checkpoint). Raises
    WeightsError when the write fails (the previous checkpoint stays intact)."""
    trainer = {
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": state.step,
        "seed": state.seed,
        **extra,
    }
    disc_weights = {}
    if state.disc is not None:
        trainer["disc"] = {"optimizer": state.disc.optimizer.state_dict(),
                           "scaler": (state.disc.scaler.state_dict()
                                      if state.disc.scaler is not None else None)}
        disc_weights[DISC_FILE] = state.disc.model.state_dict()
    data = CheckpointData(model=state.model.state_dict(), ema=ema_state_dict(state),
                          trainer=trainer, metadata={**metadata, "step": str(state.step)},
                          extra_weights=disc_weights)
    return write_checkpoint(stage_dir, state.step, data, keep_last)


def load_checkpoint(ckpt: Path, state: TrainState,
                    hashed: bool = True) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights, EMA, optimizer, scaler, step and seed into `state` (in place: the
    module's parameters, the EMA tensors, the optimizer and scaler state) and return the new
    state and the extras (data position, counters). `hashed=False` skips the sha256 check of
    the files (sizes are still checked) for a checkpoint that `damage` has just checked. Raises
    WeightsError naming the file when a file is damaged or does not match the model."""
    data = read_checkpoint(ckpt, hashed)
    load_into(state.model, data.model, ckpt / "model.safetensors")
    ema_names = {clean_key(name): name for name in state.ema}
    check_compatible(ckpt / "ema.safetensors",
                     {k: state.ema[n] for k, n in ema_names.items()},
                     {k: v for k, v in data.ema.items() if k in ema_names}, strict=True)
    with torch.no_grad():
        for key, name in ema_names.items():
            state.ema[name].copy_(data.ema[key])
    trainer = dict(data.trainer)
    try:
        load_optimizer(state.optimizer, trainer.pop("optimizer"))
        scaler_state = trainer.pop("scaler", None)
        if state.scaler is not None and scaler_state is not None:
            state.scaler.load_state_dict(scaler_state)
        step, seed = int(trainer.pop("step")), int(trainer.pop("seed"))
    except (KeyError, ValueError, TypeError) as err:
        raise WeightsError(f"checkpoint file {str(ckpt / 'trainer.pt')!r} does not match this "
                           f"model's optimizer ({type(err).__name__}: {err})") from err
    trainer.pop("torch_rng", None)  # written by earlier versions; no global RNG is restored
    disc = load_disc(ckpt, state.disc, data.extra_weights.get(DISC_FILE), trainer.pop("disc", None))
    disc = dataclasses.replace(disc, step=step, seed=seed) if disc is not None else None
    return dataclasses.replace(state, step=step, seed=seed, disc=disc), trainer


CONFIGURED = ("betas", "weight_decay")  # param-group settings a resume takes from the config


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(saved)` (in place: moments and step counts), keeping the
    CONFIGURED values it was built with, so `--resume RUN --set train.vae_betas=...` (or
    train.weight_decay) takes effect instead of the checkpoint's; unchanged, the two agree and
    the resume stays bitwise. The learning rate is set every step (lr_at)."""
    configured = [{k: group[k] for k in CONFIGURED if k in group}
                  for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)


def load_disc(ckpt: Path, disc: TrainState | None, weights: dict[str, torch.Tensor] | None,
              saved: dict[str, Any] | None) -> TrainState | None:
    """Restore the discriminator's weights, optimizer and scaler in place (a run without one
    ignores a saved one: the GAN term was switched off). Raises WeightsError when the run needs
    one and the checkpoint has none, or it does not fit."""
    if disc is None:
        return None
    if weights is None or saved is None:
        raise WeightsError(f"checkpoint {str(ckpt)!r} has no discriminator ({DISC_FILE}): it "
                           "was saved with vae.disc_weight=0; resume it with --set "
                           "vae.disc_weight=0, or start a new run with the GAN term")
    load_into(disc.model, weights, ckpt / DISC_FILE)
    try:
        load_optimizer(disc.optimizer, saved["optimizer"])
        if disc.scaler is not None and saved.get("scaler") is not None:
            disc.scaler.load_state_dict(saved["scaler"])
    except (KeyError, ValueError, TypeError) as err:
        raise WeightsError(f"checkpoint file {str(ckpt / 'trainer.pt')!r} does not match this "
                           f"discriminator's optimizer ({type(err).__name__}: {err})") from err
    return disc
