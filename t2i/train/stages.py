"""The two training stages wired from a Config: models, data, step, checkpoints, export.

Stage 1 (`train_vae`) trains the KL autoencoder, then measures the latent scale (1 / std of
latents) and writes `RUN/vae.safetensors`. Stage 2 (`train_diffusion`) trains the UNet (and the
text tower when it is not frozen) on latents of the frozen VAE.
"""

from __future__ import annotations

from t2i.config import Config
from t2i.train.env import (Env, autocast_dtype, commit_start, make_loader, maybe_compile,
                           per_rank_batch, restore, step_settings)
from t2i.train.run import Run
from t2i.train.env import adopt_vae
from t2i.train.unet_stage import (build_diffusion_model, check_latent_stage, latent_encoder,
                                  require_vae, text_input_fn, train_diffusion)
from t2i.train.vae_stage import build_vae, export_vae, load_vae, measure_latent_scale, train_vae

__all__ = ["Env", "adopt_vae", "autocast_dtype", "build_diffusion_model", "build_vae",
           "commit_start", "export_vae", "latent_encoder", "load_vae", "make_loader",
           "maybe_compile", "measure_latent_scale", "per_rank_batch", "require_vae", "restore",
           "step_settings", "text_input_fn", "train", "train_diffusion", "train_vae"]


def train(cfg: Config, run: Run, env: Env, vae_path: str | None = None) -> None:
    """Run the configured stage(s); a finished stage 1 is not redone on resume."""
    check_latent_stage(cfg)  # latent shards feed stage 2 only
    if cfg.train.stage in ("vae", "all") and not (env.resume and run.vae_weights.is_file()
                                                    and cfg.train.stage == "all") and not vae_path:
        train_vae(cfg, run, env)
    if cfg.train.stage in ("unet", "all"):
        train_diffusion(cfg, run, env, require_vae(cfg, run, vae_path))
