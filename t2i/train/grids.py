"""Sample grids during training: fixed prompts, fixed seeds, EMA weights swapped in and back,
through the same `t2i.sample.generate` loop as `t2i-sample`."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
from torch import nn

from t2i.config import Config
from t2i.sample import Pipeline, generate, make_grid
from t2i.train.run import Run
from t2i.train.state import TrainState, trainable

GENERIC_PROMPTS = (
    "a photo of a cat sitting on a sofa", "a red sports car on a mountain road",
    "a bowl of fruit on a wooden table", "a lighthouse at sunset, oil painting",
    "a portrait of an old man with a beard", "a city skyline at night",
    "a watercolor painting of a forest", "a cup of coffee next to a laptop",
)


def training_grid_prompts(cfg: Config) -> list[str]:
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


def write_sample_grid(state: TrainState, vae: nn.Module, cfg: Config, run: Run,
                      prompts: list[str], device: torch.device,
                      text: nn.Module | None = None) -> None:
    """The grid `samples/unet-{step:07d}.png`: `t2i.sample.generate` (the loop `t2i-sample`
    runs: PNDM, 50 steps, the run's `train.sample_guidance`, image i from seed `train.seed + i`)
    on the live modules with the EMA weights swapped in. `text`: the frozen text tower, which
    is not part of `state.model` (see unet_stage.trained_modules)."""
    text = state.model["text"] if "text" in state.model else text
    pipe = Pipeline(cfg=cfg, vae=vae, unet=state.model["unet"], text=text, device=device,
                    source=run.dir)
    with ema_weights(state):
        images = generate(pipe, prompts, guidance=pipe.guidance(None), seed=cfg.train.seed,
                          batch_size=len(prompts)).images
    run.samples_dir.mkdir(parents=True, exist_ok=True)
    grid = np.stack([np.asarray(image) for image in images])  # (N, H, W, 3) uint8
    make_grid(grid, columns=min(len(prompts), 8)).save(run.samples_dir / f"unet-{state.step:07d}.png")
    (run.samples_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
