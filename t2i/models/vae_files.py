"""Open a trained VAE from any file t2i accepts for `--vae`, without a run config.

    vae = open_vae(path)      # VAE on the CPU, eval mode, requires_grad False, latent_scale set

Accepted today: a run folder (its `vae.safetensors`) and a t2i `vae.safetensors` (its VAE config
comes from the file's `config` metadata, written by t2i-train). Foreign layouts (diffusers
`AutoencoderKL` folders, single-file LDM checkpoints) are converted by `t2i.models.vae_import`
where that module recognises them.
"""

from __future__ import annotations

from pathlib import Path

from t2i.models.io import WeightsError, load_into, load_weights, require_config
from t2i.models.vae import VAE


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
    tensors do not fit that config."""
    file = vae_weights_path(path)
    tensors, metadata = load_weights(file)
    cfg = require_config(file, metadata)
    vae = VAE(cfg.vae)
    load_into(vae, tensors, file)
    return vae.eval().requires_grad_(False)
