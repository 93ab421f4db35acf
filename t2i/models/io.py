"""Saving and loading module weights as safetensors with string metadata (e.g. the config JSON).

Keys never carry wrapper prefixes: `_orig_mod.` (torch.compile) and `module.` (DDP) are stripped
on save and on load, so weights move freely between eager, compiled and DDP-wrapped modules.
Files are written to a temporary name in the same folder and renamed, so a crash mid-write never
leaves a truncated file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class WeightsError(RuntimeError):
    """A weights file is missing, unreadable, or does not match the module; names the file."""


def clean_key(key: str) -> str:
    """Drop `_orig_mod.` / `module.` path components wherever they appear (nested wrappers)."""
    return ".".join(part for part in key.split(".") if part not in ("_orig_mod", "module"))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {clean_key(k): v for k, v in state.items()}


def save_module(path: str | Path, module: nn.Module,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `module`'s state dict (persistent buffers included) to a safetensors file."""
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous(): channels-last conv weights are stored in the standard (NCHW) layout.
    tensors = {k: v.detach().to("cpu").contiguous()
               for k, v in clean_state_dict(module.state_dict()).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file (without loading the tensors)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise WeightsError(f"cannot read weights file {str(path)!r}: {err}") from err


def check_compatible(path: str | Path, own: dict[str, torch.Tensor],
                     theirs: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Raise WeightsError naming `path` and the mismatched keys / shapes."""
    missing = sorted(set(own) - set(theirs)) if strict else []
    unexpected = sorted(set(theirs) - set(own)) if strict else []
    shapes = [f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(theirs)) if theirs[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({'; '.join(shapes[:4])})")
        raise WeightsError(f"weights file {str(path)!r} does not match the model: "
                           + "; ".join(parts) + " (was it saved with another config?)")


def load_module(path: str | Path, module: nn.Module, strict: bool = True) -> dict[str, str]:
    """Load a file written by `save_module` into `module` (eager, compiled or DDP-wrapped) and
    return its metadata. With strict=False, missing and unexpected keys are allowed but shapes
    must still match."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        theirs = clean_state_dict(load_file(str(path)))
    except Exception as err:  # noqa: BLE001
        raise WeightsError(f"cannot read weights file {str(path)!r}: {err}") from err
    raw_keys = {clean_key(k): k for k in module.state_dict()}  # clean name -> wrapped name
    own = clean_state_dict(module.state_dict())
    check_compatible(path, own, theirs, strict)
    module.load_state_dict({raw_keys.get(k, k): v for k, v in theirs.items()}, strict=strict)
    return metadata
