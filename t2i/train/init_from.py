"""`t2i-train --init-from RUN|CHECKPOINT|VAE`: start a stage from another run's weights and EMA.

The standard progression of latent diffusion training (256 px, then 512 px from the 256 px
weights, as in SD, MicroDiT and the MLPerf benchmark) and VAE fine-tuning. The new run copies
the parent checkpoint's weights (model.safetensors) and EMA weights (ema.safetensors), and
nothing else: its optimizer is fresh (AdamW without moments), its step is 0, its data position
new, its config its own (e.g. another data.resolution: conv and attention weights do not depend
on the image size). Tensors must match by name and shape; the first one that does not is named.

The parent is recorded in the run's config (`init_from`: stage, path, checkpoint, step and the
sha256 of both weight files), so config.json says where a run came from, and a start that is
resumed before its first checkpoint initializes from the same files again (a changed file is an
error). It is not a resume: `--resume` continues a run's own checkpoints and, when it has one,
ignores `init_from`.

Stage 1 also starts from a VAE file (a t2i vae.safetensors, a diffusers AutoencoderKL folder, an
LDM file): the run adopts its architecture and fine-tunes it, see init_vae.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from t2i.config import Config, ConfigError, architecture_changes, listed
from t2i.config.sections import InitFromConfig
from t2i.models.checkpoints import (CheckpointData, checkpoint_step, read_checkpoint,
                                    read_manifest, resolve_checkpoint)
from t2i.models.io import (WeightsError, clean_key, clean_state_dict, file_sha256, load_into,
                           read_metadata, require_config)
from t2i.train.init_vae import (fine_tunes_vae_file, initialize_from_vae_file, is_vae_file,
                                with_vae_file)
from t2i.train.init_tower import frozen_tower_fix, with_parent_tower
from t2i.train.state import TrainState

log = logging.getLogger("t2i.train")

SAME_ARCHITECTURE = ("--init-from needs the parent's architecture: only data, schedule and "
                     "training settings may change")


def parent_checkpoint(path: Path, stage: str) -> Path:
    """The checkpoint folder `path` names for `stage`: a `RUN/<stage>/ckpt-N` folder, or a run
    folder's newest `<stage>` checkpoint. Raises FileNotFoundError for a missing path,
    WeightsError for one with no such checkpoint, or a checkpoint of another stage."""
    _, ckpt = resolve_checkpoint(path, stage)
    if ckpt is None:
        exported = path / "vae.safetensors"
        hint = (f"; to fine-tune its exported VAE, give {str(exported)!r}"
                if stage == "vae" and exported.is_file() else "")
        raise WeightsError(f"{str(path)!r} has no {stage} checkpoint (RUN/{stage}/ckpt-N) to "
                           f"start from{hint}")
    return ckpt


def weights_sha256(ckpt: Path) -> tuple[str, str]:
    """(sha256 of model.safetensors, of ema.safetensors): as the manifest recorded them (read_
    checkpoint checks the files against it), or hashed here for a checkpoint without one."""
    manifest = read_manifest(ckpt)
    if manifest is not None:
        return manifest["model.safetensors"]["sha256"], manifest["ema.safetensors"]["sha256"]
    return file_sha256(ckpt / "model.safetensors"), file_sha256(ckpt / "ema.safetensors")


def with_parent(cfg: Config, path: str, explicit: Sequence[str] = ()) -> Config:
    """`cfg` recording `path` (run or checkpoint folder; for stage 1 also a VAE file, adopting
    its architecture: init_vae.with_vae_file, which reads `explicit`, the user's `key=value`
    overrides) as the parent of the stage it trains; a stage-2 child freezing its text tower
    takes its parent's frozen tower, or must name one with the same weights (init_tower.py,
    which reads `explicit` too). Raises ValueError when the stage is "all" (which stage would
    it be?), FileNotFoundError and WeightsError as parent_checkpoint, as with_vae_file (a VAE
    file for stage 2 among them), and as with_parent_tower (another tower than the parent's)."""
    stage = cfg.train.stage
    if stage not in ("unet", "vae"):
        raise ValueError(no_stage_message(path))
    if stage == "vae" and not Path(path).exists():
        raise FileNotFoundError(f"{path!r}: no such run folder, checkpoint, VAE file (a t2i "
                                f"vae.safetensors, an LDM file) or diffusers AutoencoderKL folder")
    if is_vae_file(Path(path)):
        return with_vae_file(cfg, path, explicit)
    ckpt = parent_checkpoint(Path(path), stage)
    model_sha, ema_sha = weights_sha256(ckpt)
    parent = InitFromConfig(stage=stage, path=str(path), checkpoint=str(ckpt.resolve()),
                            step=checkpoint_step(ckpt), sha256=model_sha, ema_sha256=ema_sha)
    child = with_parent_tower(dataclasses.replace(cfg, init_from=parent), explicit)
    check_parent_architecture(child, ckpt)
    return child


def check_parent_architecture(cfg: Config, ckpt: Path) -> None:
    """The child `cfg` must have the architecture of the stage's model that the parent
    checkpoint `ckpt` was trained with (its config in model.safetensors' metadata; the text
    tower is checked by init_tower.with_parent_tower). Raises ConfigError naming the fields
    that differ: weights of the same shapes would load and compute something else
    (config/architecture.py)."""
    path = ckpt / "model.safetensors"
    theirs = require_config(path, read_metadata(path))
    changes = architecture_changes(theirs, cfg, (cfg.train.stage,))
    if changes:
        raise ConfigError(f"--init-from {ckpt}: the parent was trained with {listed(changes)}; "
                          f"{SAME_ARCHITECTURE}")


def no_stage_message(path: str) -> str:
    """One line for --init-from without --stage unet or vae: for a VAE file or folder
    (is_vae_file; a t2i file of another model is none), the stage that takes it; else both
    stages. Raises WeightsError as is_vae_file, and for a damaged safetensors file."""
    found = Path(path)
    metadata = read_metadata(found) if found.is_file() and found.suffix == ".safetensors" else {}
    if (found.exists() and is_vae_file(found)
            and metadata.get("stage", "vae") in ("vae", "import")):
        return (f"--init-from {path} is a VAE: fine-tune it with --stage vae (to train the "
                f"diffusion stage on it, pass it with --vae instead)")
    return (f"--init-from {path}: name the stage it starts, --stage unet (the diffusion model, "
            f"on the parent's VAE) or --stage vae (fine-tune the parent's VAE)")


def parent_vae(cfg: Config) -> Path | None:
    """The VAE the parent's UNet was trained on (its run's vae.safetensors), for a stage-2
    start from a parent when no --vae is given; None when there is no such file."""
    if cfg.init_from.stage != "unet":
        return None
    found = Path(cfg.init_from.checkpoint).parent.parent / "vae.safetensors"
    return found if found.is_file() else None


def initialize_from_parent(state: TrainState, cfg: Config, stage: str) -> TrainState:
    """`state` with the parent's weights and EMA copied in (in place: the module's parameters
    and buffers, the EMA tensors), when `cfg.init_from` names a parent of `stage` and `state`
    is at step 0 (not restored from a checkpoint of the run's own); else `state` unchanged.
    Optimizer, step and seed stay fresh. Raises WeightsError when the parent's files changed
    since they were recorded, are damaged, or a tensor does not match by name and shape."""
    parent = cfg.init_from
    if parent.stage != stage or state.step > 0:
        return state
    if fine_tunes_vae_file(cfg):
        return initialize_from_vae_file(state, parent)
    ckpt = Path(parent.checkpoint)
    if not ckpt.is_dir():
        raise WeightsError(f"the parent checkpoint {parent.checkpoint!r} (init_from in the "
                           f"run's config) no longer exists")
    if weights_sha256(ckpt) != (parent.sha256, parent.ema_sha256):
        raise WeightsError(f"the parent checkpoint {parent.checkpoint!r} changed since this run "
                           f"recorded it (init_from.sha256): restore it or start a new run")
    copy_parent(state, read_checkpoint(ckpt), ckpt)
    log.info("%s: weights and EMA from %s (step %d); fresh optimizer, step 0", stage, ckpt,
             parent.step)
    return state


def copy_parent(state: TrainState, parent: CheckpointData, ckpt: Path) -> None:
    """Copy the parent's weights into `state.model` and its EMA into `state.ema` (in place).
    Raises WeightsError naming the first tensor that does not match by name and shape."""
    own = clean_state_dict(state.model.state_dict())
    ema_names = {clean_key(name): name for name in state.ema}
    for found, theirs, what in ((first_mismatch(own, parent.model), parent.model, "model"),
                                (first_mismatch({k: own[k] for k in ema_names}, parent.ema,
                                                extra_ok=True), parent.ema, "ema")):
        if found:
            fix = (frozen_tower_fix(holds_tower(own), ckpt)
                   if holds_tower(own) != holds_tower(theirs) else SAME_ARCHITECTURE)
            raise WeightsError(f"--init-from {str(ckpt)!r} ({what}.safetensors): {found}; {fix}")
    load_into(state.model, parent.model, ckpt / "model.safetensors")
    with torch.no_grad():
        for key, name in ema_names.items():
            state.ema[name].copy_(parent.ema[key])


def holds_tower(weights: dict[str, torch.Tensor]) -> bool:
    """Stage-2 weights with a text tower: a trained one (a frozen tower is stored once per run,
    not in checkpoints)."""
    return any(name.startswith("text.") for name in weights)


def first_mismatch(own: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                   extra_ok: bool = False) -> str | None:
    """The first tensor (in the model's order, then the parent's extras unless `extra_ok`) that
    is missing from the parent, has another shape there, or exists only there; None when all
    match."""
    for name, tensor in own.items():
        if name not in theirs:
            return f"tensor {name} {tuple(tensor.shape)} of this model is not in the parent"
        if theirs[name].shape != tensor.shape:
            return (f"tensor {name} is {tuple(theirs[name].shape)} in the parent, "
                    f"{tuple(tensor.shape)} in this model")
    extra = [name for name in theirs if name not in own]
    if extra and not extra_ok:
        shape = tuple(theirs[extra[0]].shape)
        return f"the parent's tensor {extra[0]} {shape} is not in this model"
    return None
