"""Sample grids during training: fixed prompts, fixed seeds, EMA weights swapped in and back."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from t2i import rng
from t2i.config import Config
from t2i.models.text import tokenize
from t2i.sample import denoise, make_grid, to_uint8
from t2i.schedulers import NoiseSchedule, pndm
from t2i.train.run import Run
from t2i.train.state import TrainState, trainable

GENERIC_PROMPTS = (
    "a photo of a cat sitting on a sofa", "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table", "a lighthouse at sunset, oil painting",
    "a portrait of an old man with a beard", "a city skyline at night",
    "a watercolor painting of a forest", "a cup of coffee next to a laptop",
)


def grid_prompts(cfg: Config) -> list[str]:
    """For the shapes set: seen combinations, then held-out ones (never seen in training)."""
    if cfg.data.source != "shapes":
        return list(GENERIC_PROMPTS)
    from t2i.data.shapes import grid_prompts as shapes_grid_prompts
    return shapes_grid_prompts()


@contextlib.contextmanager
def ema_weights(state: TrainState) -> Iterator[None]:
    """Temporarily copy the EMA values into the trained parameters, then restore them."""
    params = trainable(state.model)
    backup = {name: p.detach().clone() for name, p in params.items()}
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state.ema[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(backup[name])


@torch.no_grad()
def sample_latents(model: nn.ModuleDict, cfg: Config, prompts: list[str], device: torch.device,
                   steps: int = 50, guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """PNDM latents for `prompts` with per-image seeds derived from `seed`."""
    text = model["text"]
    cond = text(tokenize(prompts, text.context_length).to(device))[0]  # (N, L, D)
    uncond = text(tokenize([""], text.context_length).to(device))[0].expand_as(cond)
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    shape = (cfg.vae.z_channels, res // f, res // f)
    noise = torch.stack([torch.randn(shape, generator=rng.generator(seed, "grid", i))
                         for i in range(len(prompts))]).to(device)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    state = pndm.init(schedule, num_inference_steps=steps, skip_prk_steps=True, steps_offset=1,
                      prediction_type=cfg.schedule.prediction_type, shape=noise.shape,
                      device=device, dtype=noise.dtype)
    return denoise(model["unet"], pndm, state, noise * state.init_noise_sigma, cond, uncond,
                   guidance)


def write_sample_grid(state: TrainState, vae: nn.Module, cfg: Config, run: Run,
                      prompts: list[str], device: torch.device) -> None:
    with ema_weights(state):
        latents = sample_latents(state.model, cfg, prompts, device,
                                 guidance=cfg.train.sample_guidance, seed=cfg.train.seed)
    with torch.no_grad():
        images = vae.decode(latents / vae.latent_scale)
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    make_grid(to_uint8(images), columns=min(len(prompts), 8)).save(
        run.samples_dir / f"unet-{state.step:07d}.png")
    (run.samples_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
