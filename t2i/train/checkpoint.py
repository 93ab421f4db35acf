"""Checkpoints: safetensors weights + a small trainer file, written atomically, with retention.

Layout of one stage folder (`RUN/vae/` or `RUN/unet/`):

    ckpt-000500/model.safetensors   trained weights (clean names, config in metadata)
    ckpt-000500/ema.safetensors     EMA weights (same keys)
    ckpt-000500/trainer.pt          optimizer, GradScaler, step, seed, data position, counters
    latest                          text file naming the newest complete checkpoint

A checkpoint is written into `ckpt-N.tmp/` and renamed when complete, then `latest` is
replaced atomically, so a crash mid-write leaves the previous checkpoint loadable. Only
safetensors and `torch.load(weights_only=True)` are ever read.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save_file

from t2i.train.state import TrainState, ema_state_dict

CKPT_PREFIX = "ckpt-"
FILES = ("model.safetensors", "ema.safetensors", "trainer.pt")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the model; the message names it."""


def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors file written to a temporary name and renamed."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(_contiguous(state_dict), str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not Path(path).is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except Exception as err:  # noqa: BLE001 - truncated or not a safetensors file
        raise CheckpointError(f"cannot read weights file {str(path)!r}: {err}") from err


def save_checkpoint(stage_dir: Path, state: TrainState, extra: dict[str, Any],
                    metadata: dict[str, str], keep_last: int) -> Path:
    """Write checkpoint `ckpt-{step}` atomically, point `latest` at it, prune old ones."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    name = f"{CKPT_PREFIX}{state.step:07d}"
    tmp, final = stage_dir / (name + ".tmp"), stage_dir / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {**metadata, "step": str(state.step)}
    save_file(_contiguous(state.model.state_dict()), str(tmp / "model.safetensors"), metadata=meta)
    save_file(_contiguous(ema_state_dict(state)), str(tmp / "ema.safetensors"), metadata=meta)
    trainer = {
        "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "step": state.step,
        "seed": state.seed,
        "torch_rng": torch.get_rng_state(),
        **extra,
    }
    torch.save(trainer, tmp / "trainer.pt")
    if final.exists():  # re-saving the same step (e.g. interrupted right after a save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer_tmp = stage_dir / "latest.tmp"
    pointer_tmp.write_text(name + "\n")
    os.replace(pointer_tmp, stage_dir / "latest")
    prune(stage_dir, keep_last, protect=final)
    return final


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first (`.tmp` leftovers are never complete)."""
    if not stage_dir.is_dir():
        return []
    found = [p for p in stage_dir.iterdir()
             if p.is_dir() and p.name.startswith(CKPT_PREFIX) and not p.name.endswith(".tmp")
             and all((p / f).is_file() for f in FILES)]
    return sorted(found, key=lambda p: p.name)


def prune(stage_dir: Path, keep_last: int, protect: Path) -> None:
    if keep_last <= 0:
        return
    for old in complete_checkpoints(stage_dir)[:-keep_last]:
        if old != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is stale."""
    pointer = stage_dir / "latest"
    if pointer.is_file():
        candidate = stage_dir / pointer.read_text().strip()
        if candidate.is_dir() and all((candidate / f).is_file() for f in FILES):
            return candidate
    found = complete_checkpoints(stage_dir)
    return found[-1] if found else None


def load_checkpoint(ckpt: Path, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """Restore weights, EMA, optimizer, scaler, step and seed into `state`; return the extras
    (data position, counters). Shapes and keys must match exactly."""
    for f in FILES:
        if not (ckpt / f).is_file():
            raise CheckpointError(f"checkpoint {str(ckpt)!r} is incomplete: {f} is missing")
    weights, _ = load_weights(ckpt / "model.safetensors")
    load_strict(state.model, weights, ckpt / "model.safetensors")
    ema, _ = load_weights(ckpt / "ema.safetensors")
    with torch.no_grad():
        for name, value in state.ema.items():
            value.copy_(ema[name])
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True, map_location="cpu")
    state.optimizer.load_state_dict(trainer.pop("optimizer"))
    scaler_state = trainer.pop("scaler")
    if state.scaler is not None and scaler_state is not None:
        state.scaler.load_state_dict(scaler_state)
    torch.set_rng_state(trainer.pop("torch_rng"))
    state = dataclasses.replace(state, step=int(trainer.pop("step")), seed=int(trainer.pop("seed")))
    return state, trainer


def load_strict(module: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path) -> None:
    """load_state_dict(strict=True) with an error naming the file and the first mismatches."""
    from t2i.models.io import WeightsError, check_compatible
    try:
        check_compatible(path, module.state_dict(), weights)
    except WeightsError as err:
        raise CheckpointError(str(err)) from err
    module.load_state_dict(weights, strict=True)
