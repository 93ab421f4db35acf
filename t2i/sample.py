"""Text -> latents -> image: the sampling loop with classifier-free guidance, and image grids.

`denoise` is the whole reverse process as one pure function of (UNet, sampler, scheduler
state, text states, initial noise): the conditional and unconditional passes are one batched
UNet call, and the scheduler step is a pure function over frozen tensor state, so on CUDA the
UNet + step can be compiled and captured as a CUDA graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from t2i import rng
from t2i.config import Config
from t2i.schedulers import NoiseSchedule, lms, pndm

SAMPLERS: dict[str, ModuleType] = {"pndm": pndm, "lms": lms}


def sampler_module(name: str) -> ModuleType:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def guided_eps(unet: nn.Module, x_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
               uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + g * (out_c - out_u), one batched
    UNet call for both halves; guidance 1 runs the conditional pass only."""
    b = x_in.shape[0]
    if uncond is None or guidance == 1.0:
        return unet(x_in, t.expand(b), cond)
    out = unet(torch.cat([x_in, x_in]), t.expand(2 * b), torch.cat([uncond, cond]))  # (2B, C, h, w)
    out_u, out_c = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


def denoise(unet: nn.Module, sampler: ModuleType, state: Any, x: torch.Tensor,
            cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Run the sampler from `x` (already scaled by init_noise_sigma) to clean latents."""
    for t in state.timesteps:
        x_in = sampler.scale_model_input(state, x)
        out = guided_eps(unet, x_in, t, cond, uncond, guidance)
        x, state = sampler.step(state, out.to(x.dtype), x)
    return x


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> Image.Image:
    """(N, H, W, 3) uint8 -> one PIL image, `columns` per row, white padding."""
    n, h, w, _ = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return Image.fromarray(grid)


# ----------------------------------------------------------------------------------------------
# Loading a trained run and generating images (the Python API behind `t2i-sample`)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pipeline:
    """Everything needed to turn prompts into images: config and the three networks."""

    cfg: Config
    vae: nn.Module
    unet: nn.Module
    text: nn.Module
    device: torch.device
    source: Path

    def guidance(self, requested: float | None) -> float:
        """The CFG scale to sample with: `requested`, else the run's train.sample_guidance."""
        return self.cfg.train.sample_guidance if requested is None else requested


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def _find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, diffusion checkpoint folder) for a run folder or a checkpoint folder."""
    from t2i.train.checkpoint import latest_checkpoint  # file layout only; no training code runs
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r}: no such run folder or checkpoint")
    if (path / "ema.safetensors").is_file():  # RUN/unet/ckpt-N
        return path.parent.parent, path
    ckpt = latest_checkpoint(path / "unet")
    if ckpt is None:
        raise FileNotFoundError(f"{str(path)!r} has no diffusion checkpoint (RUN/unet/ckpt-*); "
                                "train stage 2 first")
    return path, ckpt


def load_pipeline(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Pipeline:
    """Load a run folder (its latest diffusion checkpoint) or a `RUN/unet/ckpt-N` folder."""
    from t2i.config import config_from_json
    from t2i.models.text import build_text_encoder
    from t2i.models.unet import UNet
    from t2i.models.vae import VAE
    from t2i.train.checkpoint import load_strict

    device = torch.device(device)
    run_dir, ckpt = _find_checkpoint(Path(path))
    weights_path = ckpt / ("ema.safetensors" if ema else "model.safetensors")
    weights, metadata = _read_safetensors(weights_path)
    cfg = config_from_json(metadata["config"])
    vae_weights, _ = _read_safetensors(run_dir / "vae.safetensors")
    vae = VAE(cfg.vae)
    load_strict(vae, vae_weights, run_dir / "vae.safetensors")
    model = nn.ModuleDict({"unet": UNet(cfg.unet),
                           "text": build_text_encoder(dataclasses.replace(cfg.text, pretrained="",
                                                                          weights=""))})
    load_strict(model, weights, weights_path)
    for module in (vae, model):
        module.to(device).eval().requires_grad_(False)
    return Pipeline(cfg=cfg, vae=vae, unet=model["unet"], text=model["text"], device=device,
                    source=ckpt)


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                              "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the networks: `auto` is bf16 on CUDA and fp32 (no autocast) elsewhere.
    The scheduler step stays in float32: `denoise` casts the UNet output back."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def compile_pipeline(pipe: Pipeline) -> Pipeline:
    """The same pipeline with the UNet under torch.compile(fullgraph=True), and on CUDA with
    CUDA graphs (mode "reduce-overhead"): each UNet output is consumed by the scheduler step
    before the next call replays the graph, as the graphs require."""
    mode = "reduce-overhead" if pipe.device.type == "cuda" else None
    return dataclasses.replace(pipe, unet=torch.compile(pipe.unet, fullgraph=True, mode=mode))


@dataclass(frozen=True)
class Generation:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # (N, C, h, w) final latents (scaled)


def check_size(cfg: Config, height: int, width: int) -> None:
    multiple = cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {multiple} "
                             f"(VAE factor {cfg.vae.downsample_factor} x UNet downsampling)")


def init_sampler(pipe: Pipeline, sampler: str, steps: int, strength: float, shape: tuple) -> Any:
    schedule = NoiseSchedule.from_config(pipe.cfg.schedule)
    return sampler_module(sampler).init(schedule, num_inference_steps=steps, steps_offset=1,
                                        strength=strength, shape=shape, device=pipe.device,
                                        dtype=torch.float32)


def encode_image(pipe: Pipeline, image: Image.Image, height: int, width: int) -> torch.Tensor:
    """An init image resized to (height, width) -> scaled latents (1, C, h, w) (posterior mean)."""
    array = np.asarray(image.convert("RGB").resize((width, height), Image.BICUBIC), np.float32)
    x = torch.from_numpy(array).permute(2, 0, 1)[None] / 127.5 - 1  # (1, 3, H, W)
    return pipe.vae.encode(x.to(pipe.device)).mode() * pipe.vae.latent_scale


@torch.no_grad()
def generate(pipe: Pipeline, prompts: list[str], *, negative: str = "", sampler: str = "pndm",
             steps: int = 50, guidance: float = 5.0, seed: int = 0, batch_size: int = 8,
             height: int | None = None, width: int | None = None,
             init_image: Image.Image | None = None, strength: float = 0.8,
             precision: str = "fp32") -> Generation:
    """Images for `prompts`; image i uses seed `seed + i` (its noise is drawn on the CPU from that
    seed alone, so its noise does not depend on the batch it is in or on the device).

    img2img: with `init_image`, the run starts from the image's latents noised to the timestep
    where a fraction `strength` of the schedule remains: 0 returns the encoded-decoded input,
    1 ignores the image entirely (pure noise, as text-to-image). `precision`: see `autocast`."""
    cfg = pipe.cfg
    height, width = height or cfg.data.resolution, width or cfg.data.resolution
    check_size(cfg, height, width)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength} must be between 0 and 1")
    f = cfg.vae.downsample_factor
    shape = (cfg.vae.z_channels, height // f, width // f)
    seeds = [seed + i for i in range(len(prompts))]
    x0 = encode_image(pipe, init_image, height, width) if init_image is not None else None
    with autocast(pipe.device, precision):
        latents = [_generate_chunk(pipe, prompts[i:i + batch_size], seeds[i:i + batch_size],
                                   shape, negative, sampler, steps, guidance, x0, strength)
                   for i in range(0, len(prompts), batch_size)]
    latents = torch.cat(latents)  # (N, C, h, w)
    decoded = torch.cat([pipe.vae.decode(z / pipe.vae.latent_scale).float()
                         for z in latents.split(batch_size)])  # (N, 3, H, W), fp32 VAE
    return Generation(images=[Image.fromarray(a) for a in to_uint8(decoded)],
                      prompts=list(prompts), seeds=seeds, latents=latents)


def _generate_chunk(pipe: Pipeline, chunk: list[str], chunk_seeds: list[int], shape: tuple,
                    negative: str, sampler: str, steps: int, guidance: float,
                    x0: torch.Tensor | None, strength: float) -> torch.Tensor:
    """Final latents (b, C, h, w) of one batch of prompts; see `generate`."""
    from t2i.models.text import tokenize
    noise = torch.stack([torch.randn(shape, generator=rng.generator(s)) for s in chunk_seeds])
    noise = noise.to(pipe.device)  # (b, C, h, w)
    if x0 is not None and strength == 0.0:
        return x0.expand_as(noise)
    length = pipe.text.context_length
    cond = pipe.text(tokenize(chunk, length).to(pipe.device))[0]  # (b, L, D)
    uncond = pipe.text(tokenize([negative], length).to(pipe.device))[0].expand_as(cond)
    state = init_sampler(pipe, sampler, steps, strength if x0 is not None else 1.0, noise.shape)
    module = sampler_module(sampler)
    x = (module.add_noise(state, x0.expand_as(noise), noise)
         if x0 is not None and strength < 1.0 else noise * state.init_noise_sigma)
    return denoise(pipe.unet, module, state, x, cond, uncond, guidance)
