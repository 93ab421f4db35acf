"""The diffusion train step runs its frozen encoders (VAE encoder, frozen text tower) under the
step's autocast, and hands the objective float32 latents. CPU, tiny preset, bf16 autocast
(emulated where the CPU lacks bf16 instructions)."""

from __future__ import annotations

import dataclasses

import torch

from bench import core
from bench.cases.train import bench_config, build_vae, diffusion_setup
from t2i.train import distributed
from t2i.train.stages import Env, latent_encoder, step_settings, text_input_fn
from t2i.train.step import diffusion_train_step


def test_frozen_encoders_run_under_the_steps_autocast_and_latents_stay_float32():
    cfg = bench_config(core.BenchContext(preset="tiny", quick=True), "unet")  # batch 2
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="bf16"),
                              text=dataclasses.replace(cfg.text, frozen=True))
    env = Env(device=torch.device("cpu"), world=distributed.World(), resume=False,
              show_progress=False)
    setup = diffusion_setup(cfg, env)
    settings = step_settings(cfg, env, setup.stage, setup.lr, setup.total_steps)
    assert settings.autocast_dtype == torch.bfloat16
    real_encode = latent_encoder(build_vae(cfg, env.device).eval().requires_grad_(False),
                                 env.device, cache=None)
    real_text = text_input_fn(cfg, setup.state.model["text"], env.device)
    seen = {}

    def encode(batch, eps_z):
        seen["encode"] = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")
        return real_encode(batch, eps_z)

    def text_input(batch, drop):
        seen["text"] = torch.is_autocast_enabled("cpu")
        return real_text(batch, drop)

    def objective(latents, text_in, t, noise):
        seen["latents"] = latents.dtype
        return setup.objective(latents, text_in, t, noise)

    f = cfg.vae.downsample_factor
    state, metrics = diffusion_train_step(
        setup.state, setup.batch, objective=objective, settings=settings, encode=encode,
        text_input=text_input,
        latent_shape=(cfg.vae.z_channels, cfg.data.resolution // f, cfg.data.resolution // f),
        num_train_timesteps=cfg.schedule.num_train_timesteps, cond_drop=cfg.train.cond_drop)
    assert seen["encode"] == (True, torch.bfloat16) and seen["text"] is True
    assert seen["latents"] == torch.float32
    assert torch.isfinite(metrics["loss"]) and state.step == setup.state.step + 1

