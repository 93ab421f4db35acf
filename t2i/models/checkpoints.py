"""Checkpoint folders: the one place that knows their layout, writes them and verifies them.

One stage folder (`RUN/vae/` or `RUN/unet/`):

    ckpt-0000500/model.safetensors   trained weights (clean names, config in metadata)
    ckpt-0000500/ema.safetensors     EMA weights (same keys)
    ckpt-0000500/trainer.pt          optimizer, GradScaler, step, seed, data position, counters
    ckpt-0000500/disc.safetensors    (stage 1 with a GAN term only) the PatchGAN discriminator;
                                     its optimizer and scaler are in trainer.pt under "disc"
    ckpt-0000500/manifest.json       size and sha256 of every file above, recorded when written
    latest                           text file naming the newest complete checkpoint

A checkpoint is written into `ckpt-N.tmp/` and renamed when complete, then `latest` is replaced
atomically, so a crash mid-write leaves the previous checkpoint loadable; a failed write (a full
disk) removes the temporary folder. Old checkpoints are pruned by renaming them to
`.trash-ckpt-N` first, so a kill mid-delete never leaves a `ckpt-N` without its files;
`clean_leftovers` removes what a killed process left behind. Loading checks each file against
the manifest, so a truncated, garbage or bit-flipped file is reported by name. Only safetensors
and `torch.load(weights_only=True)` are read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2i.models.io import (WeightsError, atomic_write, file_sha256, fsync_path, load_weights,
                           save_weights, tensor_bytes, write_error)

CKPT_PREFIX = "ckpt-"
FILES = ("model.safetensors", "ema.safetensors", "trainer.pt")
MANIFEST = "manifest.json"
TRASH_PREFIX = ".trash-"
_NAME = re.compile(r"ckpt-(\d+)")


@dataclass(frozen=True)
class CheckpointData:
    """The contents of one checkpoint: weights, EMA weights (same keys), the trainer's
    `torch.save`-able dict, the string metadata stored in every weights file, and optional
    further weights files by name (`disc.safetensors`), listed in the manifest when written."""

    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    metadata: dict[str, str]
    extra_weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"{CKPT_PREFIX}{step:07d}"


def checkpoint_step(ckpt: Path) -> int:
    """The step in a checkpoint folder's name (ckpt-0000004 -> 4)."""
    match = _NAME.fullmatch(Path(ckpt).name)
    if match is None:
        raise WeightsError(f"{str(ckpt)!r} is not a checkpoint folder (ckpt-N)")
    return int(match.group(1))


# ----------------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------------


def is_complete(ckpt: Path) -> bool:
    """A `ckpt-N` folder holding all of FILES (`.tmp` and trash folders never are)."""
    return (_NAME.fullmatch(ckpt.name) is not None and ckpt.is_dir()
            and all((ckpt / f).is_file() for f in FILES))


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not stage_dir.is_dir():
        return []
    return sorted((p for p in stage_dir.iterdir() if is_complete(p)), key=checkpoint_step)


def latest_checkpoint(stage_dir: Path) -> Path | None:
    """The checkpoint `latest` names, or the newest complete one if the pointer is stale."""
    try:
        candidate = stage_dir / (stage_dir / "latest").read_text().strip()
        if is_complete(candidate):
            return candidate
    except (OSError, UnicodeDecodeError, ValueError):
        pass  # no pointer, or a garbage one: the folder listing decides
    found = complete_checkpoints(stage_dir)
    return found[-1] if found else None


def holds_checkpoints(stage_dir: Path) -> bool:
    """Any `ckpt-N` folder, complete or not."""
    return stage_dir.is_dir() and any(_NAME.fullmatch(p.name) for p in stage_dir.iterdir())


def resolve_checkpoint(path: Path, stage: str | None = None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint) for a run folder (its stage's latest checkpoint, None when it
    has none) or a `RUN/<stage>/ckpt-N` folder. Raises FileNotFoundError for a missing path,
    WeightsError for an incomplete checkpoint folder or one of another stage."""
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r}: no such run folder or checkpoint")
    if _NAME.fullmatch(path.name):
        if stage is not None and path.parent.name != stage:
            raise WeightsError(f"{str(path)!r} is a {path.parent.name} checkpoint; a {stage} "
                               f"checkpoint (RUN/{stage}/ckpt-N) or a run folder is needed")
        if not is_complete(path):
            missing = [f for f in FILES if not (path / f).is_file()]
            raise WeightsError(f"checkpoint {str(path)!r} is incomplete: {', '.join(missing)} "
                               f"missing")
        return path.parent.parent, path
    return path, latest_checkpoint(path / stage) if stage else None


# ----------------------------------------------------------------------------------------------
# Verifying
# ----------------------------------------------------------------------------------------------


def read_manifest(ckpt: Path) -> dict[str, dict] | None:
    """name -> {"bytes", "sha256"} recorded at write time (FILES and any extra weights file);
    None for a checkpoint written before manifests existed. Raises WeightsError when the
    manifest is unreadable."""
    path = ckpt / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        return {f: {"bytes": int(files[f]["bytes"]), "sha256": str(files[f]["sha256"])}
                for f in (*FILES, *sorted(set(files) - set(FILES)))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightsError(f"checkpoint {str(ckpt)!r} is damaged: {MANIFEST} is unreadable "
                           f"({type(err).__name__}: {err})") from err


def check_file(ckpt: Path, name: str, hashed: bool = True) -> Path:
    """`ckpt/name`, after checking its size and (with `hashed`) its sha256 against the
    manifest. Raises WeightsError naming the file when it is missing or its bytes changed."""
    path = ckpt / name
    if not path.is_file():
        raise WeightsError(f"checkpoint {str(ckpt)!r} is incomplete: {name} is missing")
    manifest = read_manifest(ckpt)
    if manifest is None:
        return path  # written before manifests: the readers' own checks apply
    if name not in manifest:
        raise WeightsError(f"checkpoint file {str(path)!r} is not in the checkpoint's "
                           f"{MANIFEST}: it was not written with it")
    size, entry = path.stat().st_size, manifest[name]
    if size != entry["bytes"]:
        raise WeightsError(f"checkpoint file {str(path)!r} is damaged: {size} bytes, "
                           f"{entry['bytes']} were written (truncated or overwritten)")
    if hashed and file_sha256(path) != entry["sha256"]:
        raise WeightsError(f"checkpoint file {str(path)!r} is damaged: its bytes changed since "
                           f"it was written (sha256 mismatch)")
    return path


def damage(ckpt: Path) -> str | None:
    """Why `ckpt` cannot be loaded (a missing, truncated, garbage or changed file), or None.
    Checks the bytes only, never whether the weights fit a model."""
    try:
        for name in FILES + extra_files(ckpt):
            check_file(ckpt, name)
        if read_manifest(ckpt) is None:  # no recorded hashes: parse the files instead
            read_checkpoint(ckpt)
    except WeightsError as err:
        return str(err)
    return None


def extra_files(ckpt: Path) -> tuple[str, ...]:
    """The optional weights files (beyond FILES) the checkpoint's manifest lists."""
    manifest = read_manifest(ckpt) or {}
    return tuple(name for name in manifest if name not in FILES)


def newest_intact(stage_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint without damage (starting at `latest`), and a reason for each
    newer one that was skipped."""
    pointer = latest_checkpoint(stage_dir)
    candidates = ([pointer] if pointer else []) + [
        c for c in reversed(complete_checkpoints(stage_dir)) if c != pointer]
    skipped = []
    for ckpt in candidates:
        reason = damage(ckpt)
        if reason is None:
            return ckpt, skipped
        skipped.append(reason)
    return None, skipped


# ----------------------------------------------------------------------------------------------
# Reading and writing
# ----------------------------------------------------------------------------------------------


def load_trainer(path: Path) -> dict[str, Any]:
    """trainer.pt via torch.load(weights_only=True). Raises WeightsError when unreadable."""
    try:
        trainer = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - garbage, truncated, or a pickle with code
        raise WeightsError(f"checkpoint file {str(path)!r} is damaged or not a t2i trainer file "
                           f"({type(err).__name__}: {err})") from err
    if not isinstance(trainer, dict):
        raise WeightsError(f"checkpoint file {str(path)!r} is not a t2i trainer file")
    return trainer


def read_weights(ckpt: Path, name: str, hashed: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of one weights file of a checkpoint, checked against the manifest
    (`hashed=False`: its size only, for a checkpoint `damage` has just hashed). Raises
    WeightsError naming the file."""
    path = check_file(ckpt, name, hashed)
    # the manifest's sha256 covers the file; files without one check their own tensor digest
    return load_weights(path, verify=read_manifest(ckpt) is None)


def read_checkpoint(ckpt: Path, hashed: bool = True) -> CheckpointData:
    """All of a checkpoint, each file checked (`hashed=False`: sizes only, for a checkpoint
    `damage` has just hashed; a resume then reads every byte once for the hash and once to
    load, not twice to hash). Raises WeightsError naming the damaged file."""
    model, metadata = read_weights(ckpt, "model.safetensors", hashed)
    ema, _ = read_weights(ckpt, "ema.safetensors", hashed)
    extra = {name: read_weights(ckpt, name, hashed)[0] for name in extra_files(ckpt)}
    return CheckpointData(model, ema, load_trainer(check_file(ckpt, "trainer.pt", hashed)),
                          metadata, extra)


def _nested_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nested_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nested_bytes(v) for v in obj)
    return 0


def save_trainer(trainer: dict[str, Any], path: Path) -> None:
    """torch.save into a file this function opens and closes: a failed write (a full disk)
    surfaces as the OSError behind torch's `enforce fail` and leaves no open handle holding the
    space of the removed partial file."""
    with open(path, "wb") as f:
        torch.save(trainer, f)


def _write_files(folder: Path, data: CheckpointData) -> None:
    save_weights(folder / "model.safetensors", data.model, data.metadata)
    save_weights(folder / "ema.safetensors", data.ema, data.metadata)
    atomic_write(folder / "trainer.pt", lambda tmp: save_trainer(data.trainer, tmp),
                 _nested_bytes(data.trainer))
    for name, tensors in data.extra_weights.items():
        save_weights(folder / name, tensors, data.metadata)
    files = {f: {"bytes": (folder / f).stat().st_size, "sha256": file_sha256(folder / f)}
             for f in (*FILES, *data.extra_weights)}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
    fsync_path(folder / MANIFEST)
    fsync_path(folder)


def write_checkpoint(stage_dir: Path, step: int, data: CheckpointData, keep_last: int) -> Path:
    """Write `ckpt-{step}` atomically with its manifest, point `latest` at it, prune to the
    newest `keep_last` (0 keeps all). Raises WeightsError (disk full: with the space needed and
    the intact previous checkpoint) after removing the temporary folder."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    final = stage_dir / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    previous = latest_checkpoint(stage_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _write_files(tmp, data)
    except (WeightsError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        needed = (tensor_bytes(data.model) + tensor_bytes(data.ema) + _nested_bytes(data.trainer)
                  + sum(tensor_bytes(t) for t in data.extra_weights.values()))
        kept = (f"the previous checkpoint {str(previous)!r} is intact" if previous
                else "no earlier checkpoint of this stage exists")
        raise WeightsError(f"{write_error(final, err.__cause__ or err, needed)}; removed the "
                           f"partial {tmp.name}; {kept}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # `latest` first: until the rename it names no folder and the listing decides (the
    # previous checkpoint); a kill right after the rename must not leave it on the previous one
    point_latest(stage_dir, final)
    if final.exists():  # re-saving the same step (e.g. resumed from an earlier checkpoint)
        discard(final)
    os.rename(tmp, final)
    fsync_path(stage_dir)  # the rename on disk before prune deletes the older checkpoints
    prune(stage_dir, keep_last, protect=final)
    return final


def point_latest(stage_dir: Path, ckpt: Path) -> None:
    """Replace the `latest` pointer atomically."""
    pointer_tmp = stage_dir / "latest.tmp"
    pointer_tmp.write_text(ckpt.name + "\n")
    fsync_path(pointer_tmp)
    os.replace(pointer_tmp, stage_dir / "latest")


# ----------------------------------------------------------------------------------------------
# Removing
# ----------------------------------------------------------------------------------------------


def discard(ckpt: Path) -> None:
    """Delete a checkpoint folder: rename to `.trash-<name>` (atomic), then delete."""
    trash = ckpt.with_name(TRASH_PREFIX + ckpt.name)
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(ckpt, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(stage_dir: Path, keep_last: int, protect: Path) -> None:
    """Discard all but the newest `keep_last` complete checkpoints (never `protect`)."""
    if keep_last <= 0:
        return
    for old in complete_checkpoints(stage_dir)[:-keep_last]:
        if old != protect:
            discard(old)


def discard_newer(stage_dir: Path, ckpt: Path) -> list[Path]:
    """Resuming from `ckpt`: discard the stage's later checkpoints (the training after `ckpt`
    is redone and would overwrite them) and point `latest` at `ckpt`. Returns those removed."""
    step = checkpoint_step(ckpt)
    newer = [c for c in complete_checkpoints(stage_dir) if checkpoint_step(c) > step]
    for old in newer:
        discard(old)
    point_latest(stage_dir, ckpt)
    return newer


def clean_leftovers(stage_dir: Path) -> list[str]:
    """Remove what a killed process left: `*.tmp` files and folders, `.trash-*` folders and
    `ckpt-N` folders with a file missing (never loadable). Returns the names removed. Call it
    only while holding the run folder's lock."""
    if not stage_dir.is_dir():
        return []
    removed = []
    for path in stage_dir.iterdir():
        stale = (path.name.endswith(".tmp") or path.name.startswith(TRASH_PREFIX)
                 or (_NAME.fullmatch(path.name) and path.is_dir() and not is_complete(path)))
        if stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path.name)
    return sorted(removed)
