"""Text -> latents -> image: the sampling loop with classifier-free guidance, and image grids.

`denoise` is the whole reverse process as one pure function of (UNet, sampler, scheduler
state, text states, initial noise): the conditional and unconditional passes are one batched
UNet call, and the scheduler step is a pure function over frozen tensor state that runs in
float32 with autocast off and never syncs with the host, so on CUDA the UNet can be captured
as a CUDA graph and the step compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from t2i import rng
from t2i.config import Config, image_multiple
from t2i.models.checkpoints import complete_checkpoints, read_weights, resolve_checkpoint
from t2i.models.io import WeightsError, load_into, load_weights, require_config
from t2i.schedulers import NoiseSchedule, lms, pndm

SAMPLERS: dict[str, ModuleType] = {"pndm": pndm, "lms": lms}
# Timestep spacing of each sampler in t2i-sample / generate: for every step count 1..T the first
# model call is at the noisiest timestep T - 1 (deviation: the Stable Diffusion pipelines use
# `leading` with steps_offset=1, which starts at 981 for 50 steps, at t = 1 for one step, and
# fails for T steps). PNDM `trailing` ends on round(T / n) - 1; LMS `linspace` ends on t = 0.
SPACING: dict[str, str] = {"pndm": "trailing", "lms": "linspace"}


def sampler_module(name: str) -> ModuleType:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def guided_model_output(unet: nn.Module, x_in: torch.Tensor, t: torch.Tensor,
                        cond: torch.Tensor, uncond: torch.Tensor | None,
                        guidance: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): out_u + g * (out_c - out_u) of whatever the
    UNet predicts (eps for epsilon models, v for v-prediction models: guidance is linear, so it
    applies to either), one batched UNet call for both halves; guidance 1 runs the conditional
    pass only. x_in: (B, C, h, w); cond, uncond: (B, L, D); returns (B, C, h, w)."""
    b = x_in.shape[0]
    if uncond is None or guidance == 1.0:
        return unet(x_in, t.expand(b), cond)
    out = unet(torch.cat([x_in, x_in]), t.expand(2 * b), torch.cat([uncond, cond]))  # (2B, C, h, w)
    out_u, out_c = out.chunk(2)
    return out_u + guidance * (out_c - out_u)


def denoise(unet: nn.Module, sampler: ModuleType, state: Any, x: torch.Tensor,
            cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
            on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the sampler from `x` (already scaled by init_noise_sigma) to clean latents.
    `on_step(i, n)` after UNet step i of n (1-based; PNDM makes one call more than its steps;
    no host sync: for progress bars)."""
    n = len(state.timesteps)
    for i, t in enumerate(state.timesteps, 1):
        x_in = sampler.scale_model_input(state, x)
        out = guided_model_output(unet, x_in, t, cond, uncond, guidance)
        x, state = sampler.step(state, out, x)  # float32 with autocast off, whatever `out` is
        if on_step is not None:
            on_step(i, n)
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
    compiled: bool = False  # the UNet is under torch.compile (`compile_pipeline`): see `generate`

    def guidance(self, requested: float | None) -> float:
        """The CFG scale to sample with: `requested`, else the run's train.sample_guidance."""
        return self.cfg.train.sample_guidance if requested is None else requested


def _find_checkpoint(path: Path) -> tuple[Path, Path]:
    """(run folder, diffusion checkpoint folder) for a run folder or a `RUN/unet/ckpt-N` folder.
    Raises FileNotFoundError when there is none, WeightsError for an incomplete one."""
    run_dir, ckpt = resolve_checkpoint(path, "unet")
    if ckpt is None:
        raise FileNotFoundError(f"{str(path)!r} has no diffusion checkpoint (RUN/unet/ckpt-*); "
                                "train stage 2 first")
    return run_dir, ckpt


def load_pipeline(path: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> Pipeline:
    """Load a run folder (its latest diffusion checkpoint) or a `RUN/unet/ckpt-N` folder.
    Raises FileNotFoundError (no such run or checkpoint) and WeightsError naming the file when
    a weights file is missing, damaged, has no t2i config, or does not fit that config, or
    when a frozen text tower's RUN/text.safetensors is missing or not the checkpoint's."""
    from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference, load_tower
    from t2i.models.text import build_text_encoder
    from t2i.models.unet import UNet
    from t2i.models.vae import VAE
    from t2i.models.vae_files import check_vae_architecture

    device = torch.device(device)
    run_dir, ckpt = _find_checkpoint(Path(path))
    name = "ema.safetensors" if ema else "model.safetensors"
    try:
        weights, metadata = read_weights(ckpt, name)
    except WeightsError as err:
        earlier = [c for c in complete_checkpoints(ckpt.parent) if c != ckpt]
        hint = f"; an earlier checkpoint may be intact: {earlier[-1]}" if earlier else ""
        raise WeightsError(f"{err}{hint}") from err
    cfg = require_config(ckpt / name, metadata)
    vae = VAE(cfg.vae)
    vae_weights, vae_metadata = load_weights(run_dir / "vae.safetensors")
    if "config" in vae_metadata:
        check_vae_architecture(cfg, run_dir / "vae.safetensors", vae_metadata, str(ckpt / name))
    load_into(vae, vae_weights, run_dir / "vae.safetensors")
    unet = UNet(cfg.unet)
    if METADATA_KEY in metadata:  # a frozen tower, stored once per run (models/frozen_text.py)
        reference = TowerReference.from_json(metadata[METADATA_KEY], ckpt / name)
        load_into(nn.ModuleDict({"unet": unet}), weights, ckpt / name)
        text = load_tower(run_dir / TOWER_FILE, cfg.text, reference)
    else:  # the tower is in the checkpoint (trained with the UNet, or saved by an older t2i)
        text = build_text_encoder(cfg.text, load_weights=False)  # no download: weights follow
        load_into(nn.ModuleDict({"unet": unet, "text": text}), weights, ckpt / name)
    model = nn.ModuleDict({"unet": unet, "text": text})
    for module in (vae, model):
        module.to(device).eval().requires_grad_(False)
    return Pipeline(cfg=cfg, vae=vae, unet=model["unet"], text=model["text"], device=device,
                    source=ckpt)


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16,
                                              "fp16": torch.float16}


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The networks' autocast dtype for `precision` (None: fp32): `auto` is bf16 on CUDA and
    fp32 elsewhere."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for the networks (see `autocast_dtype`). The scheduler step and input scaling
    stay in float32: they turn autocast off themselves."""
    dtype = autocast_dtype(device, precision)
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def hold_weights(pipe: Pipeline, precision: str) -> Pipeline:
    """The pipeline whose UNet and text tower hold their weights in the autocast dtype when
    sampling in 16 bits on CUDA, so that autocast does not re-cast every fp32 weight at every
    call (~1.3 ms per `base` UNet call at batch 1). On the CPU and for fp32 it is `pipe`
    unchanged. The VAE stays fp32. Converts the modules in place (`nn.Module.to`), once: a
    second call is free, and fp32 sampling then needs the pipeline loaded again."""
    dtype = autocast_dtype(pipe.device, precision)
    if pipe.device.type != "cuda" or dtype is None:
        return pipe
    return cast_networks(pipe, dtype)


def cast_networks(pipe: Pipeline, dtype: torch.dtype) -> Pipeline:
    """UNet and text tower converted to `dtype` in place (see `hold_weights`)."""
    return dataclasses.replace(pipe, unet=pipe.unet.to(dtype), text=pipe.text.to(dtype))


def weights_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def compile_pipeline(pipe: Pipeline) -> Pipeline:
    """The same pipeline with the UNet under torch.compile(fullgraph=True), and on CUDA with
    CUDA graphs (mode "reduce-overhead"): each UNet output is consumed (guidance arithmetic, or
    the step's float32 cast and cat) before the next call replays the graph, as graphs require."""
    mode = "reduce-overhead" if pipe.device.type == "cuda" else None
    return dataclasses.replace(pipe, unet=torch.compile(pipe.unet, fullgraph=True, mode=mode),
                               compiled=True)


def compile_sampler(sampler: str, backend: str = "inductor") -> types.SimpleNamespace:
    """A stand-in for the sampler module in `denoise` with `step` and `scale_model_input` under
    torch.compile(fullgraph=True) and never CUDA graphs: a step's outputs (the sample and the
    history, views of one buffer) are the next step's inputs, so a graphed step would overwrite
    them at its next replay while they are still in use (torch's "accessing tensor output of
    CUDAGraphs that has been overwritten by a subsequent run"). Fused, the step is a few kernels."""
    module = sampler_module(sampler)
    return types.SimpleNamespace(
        step=torch.compile(module.step, fullgraph=True, backend=backend),
        scale_model_input=torch.compile(module.scale_model_input, fullgraph=True, backend=backend))


@dataclass(frozen=True)
class Generation:
    images: list[Image.Image]
    prompts: list[str]
    seeds: list[int]
    latents: torch.Tensor  # (N, C, h, w) final latents (scaled)


def check_size(cfg: Config, height: int, width: int) -> None:
    multiple = image_multiple(cfg)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"--{name} {value} must be a positive multiple of {multiple} "
                             f"(VAE factor {cfg.vae.downsample_factor} x UNet downsampling)")


def check_strength(strength: float, steps: int, img2img: bool) -> None:
    """img2img runs the last int(steps x strength) steps: a strength above 0 that runs none is
    refused (strength 0 is the documented way to get the encoded-decoded image back). Raises
    ValueError naming --strength and --steps."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength {strength} must be between 0 and 1")
    if img2img and strength > 0 and int(steps * strength) == 0:
        raise ValueError(f"--strength {strength} with --steps {steps} runs no denoising step "
                         f"(int(steps x strength) = 0): raise --steps or --strength "
                         f"(--strength 0 returns the encoded-decoded image)")


def sampler_state(schedule: NoiseSchedule, sampler: str, steps: int, strength: float,
                  shape: tuple, device: torch.device | str | None = None) -> Any:
    """The float32 scheduler state of a `t2i-sample` run: `SPACING` (first call at T - 1 for
    every step count 1..T), no steps_offset."""
    return sampler_module(sampler).init(schedule, num_inference_steps=steps,
                                        timestep_spacing=SPACING[sampler], strength=strength,
                                        shape=shape, device=device, dtype=torch.float32)


def init_sampler(pipe: Pipeline, sampler: str, steps: int, strength: float, shape: tuple) -> Any:
    return sampler_state(NoiseSchedule.from_config(pipe.cfg.schedule), sampler, steps, strength,
                         shape, pipe.device)


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
             precision: str = "fp32",
             on_batch: Callable[[Generation], None] | None = None,
             on_step: Callable[[int, int], None] | None = None) -> Generation:
    """Images for `prompts`; image i uses seed `seed + i` (its noise is drawn on the CPU from that
    seed alone, so its noise does not depend on the batch it is in or on the device).

    img2img: with `init_image`, the run starts from the image's latents noised to the timestep
    where a fraction `strength` of the schedule remains: 0 returns the encoded-decoded input,
    1 ignores the image entirely (pure noise, as text-to-image). `precision`: see `autocast`;
    16-bit on CUDA converts the pipeline's UNet and text tower to that dtype in place, once
    (`hold_weights`). With a compiled UNet (`pipe.compiled`) a smaller last batch is padded to
    the first one's size (rows dropped after), so the UNet sees one shape: another shape would
    compile it again, a minute or more for `base`. `on_batch(part)` is called with each batch's
    images as soon as they are decoded (t2i-sample writes them then); `on_step(i, n)` after
    each denoising step i of a batch's n (its progress bar)."""
    pipe = hold_weights(pipe, precision)
    if autocast_dtype(pipe.device, precision) is None and weights_dtype(pipe.unet) != torch.float32:
        raise ValueError(f"--precision {precision}: this pipeline holds {weights_dtype(pipe.unet)} "
                         "weights (sampled in 16 bits before); load it again for fp32")
    cfg = pipe.cfg
    height = cfg.data.resolution if height is None else height  # 0 is refused, not the default
    width = cfg.data.resolution if width is None else width
    check_size(cfg, height, width)
    if not 1 <= steps <= cfg.schedule.num_train_timesteps:
        raise ValueError(f"--steps {steps} must be between 1 and {cfg.schedule.num_train_timesteps} "
                         f"(the run's schedule.num_train_timesteps)")
    check_strength(strength, steps, init_image is not None)
    f = cfg.vae.downsample_factor
    shape = (cfg.vae.z_channels, height // f, width // f)
    seeds = [seed + i for i in range(len(prompts))]
    x0 = encode_image(pipe, init_image, height, width) if init_image is not None else None
    rows = min(batch_size, len(prompts)) if pipe.compiled else 0  # every chunk's row count
    parts = []
    for i in range(0, len(prompts), batch_size):
        chunk, chunk_seeds = prompts[i:i + batch_size], seeds[i:i + batch_size]
        with autocast(pipe.device, precision):
            z = _generate_chunk(pipe, padded(chunk, rows), padded(chunk_seeds, rows), shape,
                                negative, sampler, steps, guidance, x0, strength,
                                on_step)[:len(chunk)]
        parts.append(decoded(pipe, z, chunk, chunk_seeds))  # fp32 VAE, outside autocast
        if on_batch is not None:
            on_batch(parts[-1])
    return Generation(images=[image for part in parts for image in part.images],
                      prompts=list(prompts), seeds=seeds,
                      latents=torch.cat([part.latents for part in parts]))  # (N, C, h, w)


def decoded(pipe: Pipeline, z: torch.Tensor, prompts: list[str], seeds: list[int]) -> Generation:
    """One batch's final latents z (b, C, h, w, scaled) decoded by the float32 VAE to images."""
    images = pipe.vae.decode(z / pipe.vae.latent_scale).float()  # (b, 3, H, W)
    return Generation(images=[Image.fromarray(a) for a in to_uint8(images)], prompts=list(prompts),
                      seeds=list(seeds), latents=z)


def padded(chunk: list, rows: int) -> list:
    """`chunk` with its last item repeated up to `rows` items (unchanged if it has as many)."""
    return chunk + chunk[-1:] * (rows - len(chunk))


def _generate_chunk(pipe: Pipeline, chunk: list[str], chunk_seeds: list[int], shape: tuple,
                    negative: str, sampler: str, steps: int, guidance: float,
                    x0: torch.Tensor | None, strength: float,
                    on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
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
    return denoise(pipe.unet, module, state, x, cond, uncond, guidance, on_step)
