"""Weight files: the only code that reads or writes safetensors (and foreign torch pickles).

Every file is written to a temporary name in the same folder and renamed, so a crash mid-write
never leaves a truncated file under the final name. `save_weights` records a sha256 of the
tensors and the metadata in the file's own metadata (`tensors_sha256`); `load_weights`
recomputes it, so changed bytes inside tensor data are an error, not silently wrong weights.
Keys never carry wrapper prefixes: `_orig_mod.` (torch.compile) and `module.` (DDP) are stripped
on save and on load, so weights move freely between eager, compiled and DDP-wrapped modules.
The checkpoint folder layout built on these files is in `t2i.models.checkpoints`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DIGEST_KEY = "tensors_sha256"  # metadata entry written by save_weights, checked by load_weights


class WeightsError(RuntimeError):
    """A weights file or checkpoint is missing, damaged, not t2i's, does not match the model, or
    could not be written (disk full); the message names the file and says what to do."""


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------


def clean_key(key: str) -> str:
    """Drop `_orig_mod.` / `module.` path components wherever they appear (nested wrappers)."""
    return ".".join(part for part in key.split(".") if part not in ("_orig_mod", "module"))


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {clean_key(k): v for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


# The errors a writer raises for a failed write: the OS's, torch's zip writer (RuntimeError) and
# safetensors' (SafetensorError, an Exception of its own: `... No space left on device (os error
# 28)`).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)

# Slack over the tensor bytes that a file's headers, metadata and zip records take.
OVERHEAD_BYTES = 1 << 20


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT as an OSError, or as the message of safetensors' or torch's writer
    (safetensors: `SafetensorError: ... No space left on device (os error 28)`; torch:
    `RuntimeError: [enforce fail at inline_container.cc] ... file write failed`), anywhere in
    its chain (see error_chain)."""
    return any(_says_disk_full(e) for e in error_chain(err))


def _says_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(s in text for s in ("No space left", "os error 28", "os error 122", "StorageFull",
                                   "Disk quota exceeded", "file write failed"))


def error_chain(err: BaseException) -> list[BaseException]:
    """`err` and the errors it was raised from or while handling (torch's writer raises its
    enforce failure while handling the OSError of a Python file object's write)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def is_torch_writer_failure(err: BaseException) -> bool:
    """torch's zip writer gave up (`[enforce fail at inline_container.cc:672] . unexpected pos
    ...`): it does not say why; a full disk is the usual cause (see write_error)."""
    return any(isinstance(e, RuntimeError) and "inline_container.cc" in str(e)
               for e in error_chain(err))


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds `path` (or its nearest existing parent)."""
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB' (binary units)."""
    unit = next(u for i, u in enumerate(("B", "KB", "MB", "GB", "TB")) if n < 1024 ** (i + 1)
                or u == "TB")
    return f"{n / 1024 ** ('B', 'KB', 'MB', 'GB', 'TB').index(unit):.1f} {unit}"


def write_error(path: Path, err: BaseException, needed: int) -> WeightsError:
    """One-line WeightsError for a failed write of `path` (about `needed` bytes). Disk full when
    the error says so, or when torch's writer failed without saying why and the free space is
    short of what the write needs (call it after removing the partial file)."""
    free = free_bytes(path)
    if is_disk_full(err) or (is_torch_writer_failure(err) and free < needed + OVERHEAD_BYTES):
        return WeightsError(f"disk full while writing {str(path)!r}: it needs about "
                            f"{format_bytes(needed)}, {format_bytes(free)} are free there")
    return WeightsError(f"cannot write {str(path)!r}: {type(err).__name__}: {err}")


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def atomic_write(path: Path, write: Callable[[Path], None], needed: int) -> Path:
    """Call `write(tmp)` for a temporary file beside `path`, flush it to the disk, then rename it
    to `path` (and flush the folder: fsync_path). The file
    gets the mode a plain open() gives (0o666 less the umask), whatever `write` did to it
    (safetensors' save_file and mkstemp leave 0o600). Raises WeightsError (disk full: with the
    space needed) and removes the temporary file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # as open() created it: umask (or default ACL)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
        fsync_path(tmp)  # the bytes on disk before the name: a crash never leaves it empty
        os.replace(tmp, path)
        fsync_path(path.parent)
    except WRITE_ERRORS as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err, needed) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a folder's entries (a rename, a new file), to the disk, so an OS
    crash or power cut after this returns keeps them. A filesystem that cannot sync (EINVAL,
    ENOTSUP: some network and FUSE filesystems; any error for a folder) is left as it is;
    another error (EIO: the data did not reach the disk) raises OSError."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) \
                and not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def new_temp_file(path: Path) -> Path:
    """A new empty file `.NAME.<random>.tmp` beside `path`, created as open() creates files
    (mode 0o666, which the umask or a default ACL narrows), not with mkstemp's 0o600. Raises
    OSError when it cannot be created."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def tensors_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the metadata and every tensor's name, dtype, shape and bytes (sorted)."""
    digest = hashlib.sha256(json.dumps(sorted(metadata.items())).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` (clean keys, contiguous, on the CPU) and string `metadata` to a
    safetensors file, atomically, with the tensors' sha256 in the metadata.

    Raises TypeError for non-string metadata, WeightsError when the write fails."""
    metadata = dict(metadata or {})
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata must map str to str; bad entries: {bad[:3]}")
    # contiguous(): channels-last conv weights are stored in the standard (NCHW) layout.
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in clean_state_dict(tensors).items()}
    metadata[DIGEST_KEY] = tensors_digest(tensors, metadata)
    return atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                        tensor_bytes(tensors))


def save_module(path: str | Path, module: nn.Module,
                metadata: dict[str, str] | None = None) -> Path:
    """Write `module`'s state dict (persistent buffers included) with `save_weights`."""
    return save_weights(path, module.state_dict(), metadata)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")


def _require_safetensors(path: Path) -> None:
    """Raises WeightsError when `path` is missing, or is plainly no safetensors file (empty, a
    text file, a torch pickle); a truncated one is left to the parser, which says so."""
    _require_file(path)
    if file_format(path) != "safetensors":
        raise WeightsError(f"{str(path)!r} is not a safetensors file")


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (without loading the tensors).

    Raises WeightsError when the file is missing or not a readable safetensors file."""
    path = Path(path)
    _require_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise WeightsError(f"cannot read weights file {str(path)!r} (damaged or not a "
                           f"safetensors file): {err}") from err
    metadata.pop(DIGEST_KEY, None)
    return metadata


def load_weights(path: str | Path, verify: bool = True
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; with `verify`, the recorded sha256 (files
    written by save_weights) must match. Raises WeightsError naming the file when it is
    missing, truncated, not safetensors, or its bytes changed since it was written."""
    path = Path(path)
    _require_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise WeightsError(f"cannot read weights file {str(path)!r} (damaged or not a "
                           f"safetensors file): {err}") from err
    recorded = metadata.pop(DIGEST_KEY, None)
    if verify and recorded is not None and recorded != tensors_digest(tensors, metadata):
        raise WeightsError(f"weights file {str(path)!r} is damaged: its contents do not match "
                           f"the sha256 recorded when it was written")
    return clean_state_dict(tensors), metadata


def require_config(path: str | Path, metadata: dict[str, str]) -> Any:
    """The t2i Config stored in a weights file's metadata. Raises WeightsError when there is
    none or it is not a valid config."""
    from t2i.config import ConfigError, config_from_json
    if "config" not in metadata:
        raise WeightsError(f"weights file {str(path)!r} has no `config` metadata: it was not "
                           f"written by t2i-train")
    try:
        return config_from_json(metadata["config"])
    except (ConfigError, ValueError, TypeError) as err:
        raise WeightsError(f"weights file {str(path)!r}: its `config` metadata is not a valid "
                           f"t2i config ({err})") from err


def file_format(path: Path) -> str | None:
    """"safetensors" (an 8-byte header length, then a JSON header), "torch" (torch.save's zip
    archive, or a legacy pickle: protocol opcode 0x80), or None, from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return "torch"
    return None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a `torch.load(weights_only=True)` pickle (a plain
    state dict or a training checkpoint {"state_dict": ...}), e.g. open_clip weights.

    Raises WeightsError when missing, of neither format (named so: a text file, an image),
    unreadable (corrupt, a pickle with code, TorchScript), or not a dict of tensors."""
    path = Path(path)
    _require_file(path)
    kind = file_format(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        return load_weights(path)[0]
    if kind is None:
        raise WeightsError(f"{str(path)!r} is not a weights file: neither safetensors nor a "
                           f"PyTorch checkpoint (a zip archive or a pickle)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [""])[0]  # torch's own text runs on for lines
        raise WeightsError(f"cannot read weights file {str(path)!r} ({type(err).__name__}: "
                           f"{first}); use safetensors or a plain state-dict checkpoint") from err
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"weights file {str(path)!r} is not a state dict of tensors")
    return state


def tensor_names(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, read from its header only. Raises WeightsError
    when it is missing or not a readable safetensors file."""
    path = Path(path)
    _require_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # noqa: BLE001 - truncated or foreign file
        raise WeightsError(f"cannot read weights file {str(path)!r} (damaged or not a "
                           f"safetensors file): {err}") from err


def read_tensors(path: str | Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The tensors whose names `keep` accepts, from a safetensors file (only those are read: the
    VAE of a 7 GB Stable Diffusion checkpoint) or a pickle as `read_state_dict` reads it (whole).
    Raises WeightsError as read_state_dict does."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {k: v for k, v in read_state_dict(path).items() if keep(k)}
    names = [k for k in tensor_names(path) if keep(k)]
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in names}
    except Exception as err:  # noqa: BLE001 - truncated tensor data
        raise WeightsError(f"cannot read weights file {str(path)!r} (damaged): {err}") from err


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (checkpoint manifests, latent-cache keys)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Into modules
# ----------------------------------------------------------------------------------------------


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


def load_into(module: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path,
              strict: bool = True) -> None:
    """Copy clean-keyed `tensors` (read from `path`) into `module`, eager, compiled or wrapped.
    With strict=False, missing and unexpected keys are allowed but shapes must still match.
    Raises WeightsError naming `path` and the first mismatches."""
    raw_keys = {clean_key(k): k for k in module.state_dict()}  # clean name -> wrapped name
    check_compatible(path, clean_state_dict(module.state_dict()), tensors, strict)
    module.load_state_dict({raw_keys.get(k, k): v for k, v in tensors.items()}, strict=strict)


def load_module(path: str | Path, module: nn.Module, strict: bool = True) -> dict[str, str]:
    """Load a file written by `save_module` into `module` and return its metadata. Raises
    WeightsError (see load_weights and load_into)."""
    tensors, metadata = load_weights(path)
    load_into(module, tensors, path, strict)
    return metadata
