"""Open a trained VAE from any file t2i accepts for `--vae`, without a run config.

    vae = open_vae(path)      # VAE on the CPU, eval mode, requires_grad False, latent_scale set

Accepted: a run folder (its `vae.safetensors`), a t2i `vae.safetensors` (its VAE config comes
from the file's `config` metadata, written by t2i-train or `t2i-data convert-vae`), and the
foreign layouts `t2i.models.vae_import` converts: a diffusers `AutoencoderKL` folder, an LDM /
Stable Diffusion single file.

An imported VAE, and one fine-tuned from a VAE file, brings its own architecture
(`brings_architecture`): stage 2 takes it into the run's config. Written in t2i's format
(`write_imported_vae`: `t2i-data convert-vae`, a run's copy of `--vae`) an imported VAE records
`stage: import` and `source_sha256` in its metadata; `vae_sha256` is every VAE's identity for
latent caches and latent shards, the same for a diffusers folder, its conversion and a run's
copy of either.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from t2i.config import Config, VAEConfig, architecture_changes, listed, validate
from t2i.config.architecture import NOT_ARCHITECTURE
from t2i.models.io import (WeightsError, file_sha256, load_into, load_weights, read_metadata,
                           require_config, save_weights)
from t2i.models.vae import VAE
from t2i.models.vae_import import (import_vae, imported_file, is_foreign, read_foreign,
                                   sources_sha256)


def vae_weights_path(path: str | Path) -> Path:
    """The t2i VAE file `path` names: `path` itself, or `path/vae.safetensors` for a run folder.
    Raises WeightsError when neither exists."""
    path = Path(path)
    if path.is_dir() and (path / "vae.safetensors").is_file():
        return path / "vae.safetensors"
    if path.is_file():
        return path
    raise WeightsError(f"no VAE at {str(path)!r}: give a run folder or a vae.safetensors file")


def open_vae(path: str | Path) -> VAE:
    """The VAE stored at `path` (see the module docstring), on the CPU, frozen. Raises
    WeightsError naming the file when it is missing, damaged, has no t2i config, or its
    tensors do not fit that config, or a foreign VAE cannot be imported exactly."""
    if is_foreign(path):
        return import_vae(path)
    file = vae_weights_path(path)
    tensors, metadata = load_weights(file)
    cfg = require_config(file, metadata)
    vae = VAE(cfg.vae)
    load_into(vae, tensors, file)
    return vae.eval().requires_grad_(False)


def is_t2i_vae(path: str | Path) -> bool:
    """A run folder with a vae.safetensors, or a safetensors file with t2i config metadata.
    Raises WeightsError for a damaged safetensors file."""
    path = Path(path)
    if path.is_dir():
        return (path / "vae.safetensors").is_file()
    return path.suffix == ".safetensors" and path.is_file() and "config" in read_metadata(path)


def brings_architecture(path: str | Path) -> bool:
    """True for a VAE whose architecture comes from its files, not from a run's config: a
    foreign layout, a t2i file converted from one (metadata `stage: import`), or a VAE
    fine-tuned from a VAE file (`--stage vae --init-from FILE`: its config's init_from kind
    "vae_file"), which has that file's architecture whatever preset the run named. Raises
    WeightsError for a damaged file."""
    path = Path(path)
    if is_foreign(path):
        return True
    file = path / "vae.safetensors" if path.is_dir() else path
    if not file.is_file():
        return False
    metadata = read_metadata(file)
    return metadata.get("stage") == "import" or fine_tuned_from_file(metadata)


def fine_tuned_from_file(metadata: dict[str, str]) -> bool:
    """A t2i VAE file's metadata says it was fine-tuned from a VAE file (init_vae.py)."""
    try:
        config = json.loads(metadata.get("config", "{}"))
    except ValueError:
        return False  # a damaged config is named by whoever reads it next
    parent = config.get("init_from", {}) if isinstance(config, dict) else {}
    return (metadata.get("stage") == "vae" and isinstance(parent, dict)
            and parent.get("kind") == "vae_file")


def check_vae_architecture(cfg: Config, path: Path, metadata: dict[str, str], user: str
                           ) -> None:
    """The t2i VAE file `path` (its `metadata`) must hold the VAE architecture of `cfg`, the
    config that `user` (a checkpoint, a run) builds it with. Raises WeightsError naming the
    file and the fields that differ (config/architecture.py): same-shaped weights would load
    under another vae.norm_groups or vae.downsample_padding and compute something else."""
    changes = architecture_changes(require_config(path, metadata), cfg, ("vae",))
    if changes:
        raise WeightsError(f"{str(path)!r} holds a VAE trained with {listed(changes)} in the "
                           f"config of {user}: its weights would load and compute something "
                           f"else")


def with_architecture(settings: VAEConfig, arch: VAEConfig) -> VAEConfig:
    """`arch`'s architecture with `settings`' other fields (channels_last and the stage-1
    training settings, VAEConfig.TRAINING_ONLY): what a run keeps of its own VAE section when it
    adopts an imported VAE."""
    keep = NOT_ARCHITECTURE["vae"]  # channels_last and VAEConfig.TRAINING_ONLY
    return dataclasses.replace(arch, **{name: getattr(settings, name) for name in keep})


def with_vae_architecture(cfg: Config, arch: VAEConfig) -> Config:
    """`cfg` adopting the VAE architecture `arch` (with_architecture: cfg.vae's own settings
    kept) and the UNet's in/out channels = its z_channels: the config of a run on an imported
    VAE (stage 2's `--vae`) or fine-tuning a VAE file (stage 1's `--init-from`). Raises
    ConfigError when that config is not valid (e.g. data.resolution is no multiple of the
    VAE's factor x the UNet's downsampling)."""
    vae, z = with_architecture(cfg.vae, arch), arch.z_channels
    if vae == cfg.vae and (cfg.unet.in_channels, cfg.unet.out_channels) == (z, z):
        return cfg  # (a --set equal to the file's vae.z_channels still rewires the UNet)
    return validate(dataclasses.replace(
        cfg, vae=vae, unet=dataclasses.replace(cfg.unet, in_channels=z, out_channels=z)))


def vae_sha256(path: str | Path) -> str:
    """The identity of the VAE at `path` for latent caches and latent shards: a t2i-trained
    file's sha256; for an imported VAE, that of the files it came from (`source_sha256`, which
    a converted file records), so a diffusers folder, its conversion and a run's copy agree.
    Raises WeightsError as open_vae."""
    path = Path(path)
    if is_foreign(path):
        return sources_sha256(read_foreign(path).files)
    file = vae_weights_path(path)
    return read_metadata(file).get("source_sha256") or file_sha256(file)


def write_imported_vae(source: str | Path, out: str | Path,
                       scaling_factor: float | None = None) -> VAE:
    """Convert the foreign VAE at `source` and write it to `out` as a t2i vae.safetensors
    (atomically; metadata: see vae_import.imported_file). Returns the VAE. Raises WeightsError
    naming the file that cannot be read, imported or written."""
    vae, metadata = imported_file(source, scaling_factor)
    save_weights(out, vae.state_dict(), metadata)
    return vae


def adopt_imported_vae(source: str | Path, target: str | Path) -> None:
    """A run's copy of the foreign VAE at `source`: written to `target` in t2i's format, or, when
    `target` exists, checked to hold the same tensors. Raises WeightsError when it holds another
    VAE (the run's UNet was trained on that one) or `source` cannot be imported."""
    target = Path(target)
    if not target.is_file():
        write_imported_vae(source, target)
        return
    held, converted = load_weights(target)[0], open_vae(source).state_dict()
    if held.keys() != converted.keys() or not all(torch.equal(held[k], converted[k])
                                                  for k in held):
        raise WeightsError(f"{str(target)!r} holds another VAE than --vae {str(source)!r}; its "
                           f"UNet was trained on that one: use a new --out")
