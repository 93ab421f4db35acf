"""`train-step` (stage 2, the UNet) and `train-step-vae` (stage 1): the real training steps.

Each case builds its model, TrainState, objective and StepSettings with the functions that
t2i/train/stages.py uses (imported, not copied) and times `diffusion_train_step` /
`vae_train_step` from t2i/train/step.py on one fixed batch. Data loading is left out (the `data`
case times it); everything inside the step is in: the frozen-VAE encode (left out with
`--latents`, which feeds stored moments as training on latent shards does) and the text tower
(stage 2), forward, loss, backward, gradient clipping, the non-finite guard, fused AdamW and the
EMA update.

Variants, timed alternately in one run on one shared model and optimizer: fp32 eager (the
baseline of `ratio`), bf16-autocast eager where bf16 is native (CUDA, or a CPU with bf16
instructions) or asked for with `--dtype bf16`, and the objective under torch.compile (as
`train.compile=true` does) at `--dtype`, whose `ratio_compiled` is against eager at the same
precision. FLOPs per sample are counted from one real eager step with FlopCounterMode (all
matmuls, convolutions and attention of the step, the VAE encode included); MFU is against the
device's dense peak for the row's precision, where known.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from bench.core import (BenchContext, bf16_supported, compile_fn, first_call_s, preset_config,
                        register_case, result_row, time_alternating)
from bench.flops import count_flops, throughput
from t2i.config import Config
from t2i.models.summary import count_params
from t2i.models.text import tokenize
from t2i.schedulers import NoiseSchedule
from t2i.train import distributed
from t2i.train.stages import (Env, build_diffusion_model, build_vae, latent_encoder,
                              step_settings, text_input_fn)
from t2i.train.state import TrainState, init_train_state
from t2i.train.unet_stage import stored_latents
from t2i.train.step import DiffusionObjective, VAEObjective, diffusion_train_step, vae_train_step

PROMPT = "a red circle on the left of a blue square, white background"


@dataclass(frozen=True)
class Setup:
    """One stage ready to step: its initial state, the objective to (maybe) compile, a function
    (settings, objective) -> train_step(state, batch), the batch, and the stage's lr and length."""

    state: TrainState
    objective: nn.Module
    make_step: Callable[[Any, Callable], Callable]
    batch: dict
    lr: float
    total_steps: int
    trained: nn.Module  # whose parameters are counted
    stage: str  # "vae" or "unet"


def bench_config(ctx: BenchContext, stage: str) -> Config:
    """The preset in the bench's memory format, at its resolution and batch; random text weights
    (no download, same speed), no gradient accumulation."""
    cfg = preset_config(ctx)
    res = ctx.resolution or cfg.data.resolution
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, resolution=res),
        text=dataclasses.replace(cfg.text, pretrained="", weights=""),
        train=dataclasses.replace(cfg.train, batch_size=default_batch(ctx, cfg, res, stage),
                                  grad_accum=1))


def default_batch(ctx: BenchContext, cfg: Config, res: int, stage: str) -> int:
    """--batch, else: 2 when quick; on CPU the tiny preset's own batch, 1 for bigger presets;
    on CUDA the preset's batch capped so one step fits an 80 GB GPU (UNet 64 at 256x256,
    VAE 8 at 256x256, scaled by area)."""
    if ctx.batch:
        return ctx.batch
    if ctx.quick:
        return 2
    if ctx.torch_device.type != "cuda":
        return cfg.train.batch_size if cfg.preset == "tiny" else 1
    cap = 64 if stage == "unet" else 8
    return max(1, min(cfg.train.batch_size, int(cap * (256 / res) ** 2)))


def random_images(cfg: Config, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    res, b = cfg.data.resolution, cfg.train.batch_size
    return (torch.rand(b, 3, res, res, generator=gen) * 2 - 1).to(device)  # (B, 3, H, W)


def random_moments(cfg: Config, device: torch.device) -> torch.Tensor:
    """Posterior moments as latent shards store them, (B, 2z, h, w): mean ~ N(0, 1), logvar -6
    (a trained VAE's posterior is narrow; the values do not change the cost)."""
    gen = torch.Generator().manual_seed(0)
    z, h, w = latent_shape(cfg)
    mean = torch.randn(cfg.train.batch_size, z, h, w, generator=gen)
    return torch.cat([mean, torch.full_like(mean, -6.0)], dim=1).to(device)


def input_label(batch: dict) -> str:
    """"64x3x256x256 images" or "64x8x32x32 moments": what one step reads."""
    key, label = ("moments", "moments") if "moments" in batch else ("image", "images")
    return "x".join(str(n) for n in batch[key].shape) + f" {label}"


def latent_shape(cfg: Config) -> tuple[int, int, int]:
    f, res = cfg.vae.downsample_factor, cfg.data.resolution
    return cfg.vae.z_channels, res // f, res // f


def vae_setup(cfg: Config, env: Env) -> Setup:
    """Stage 1 as `stages.train_vae` wires it."""
    vae = build_vae(cfg, env.device)
    state = init_train_state(vae, cfg.train.vae_lr, cfg.train.weight_decay, cfg.train.seed,
                             "fp32", env.device, betas=tuple(cfg.train.vae_betas))
    objective = VAEObjective(vae, cfg.train.recon_loss, cfg.train.kl_weight)

    def make_step(settings: Any, objective: Callable) -> Callable:
        return functools.partial(vae_train_step, objective=objective, settings=settings,
                                 latent_shape=latent_shape(cfg))

    return Setup(state, objective, make_step, {"image": random_images(cfg, env.device)},
                 cfg.train.vae_lr, cfg.train.vae_steps, vae, "vae")


def diffusion_setup(cfg: Config, env: Env, latents: bool = False) -> Setup:
    """Stage 2 as `stages.train_diffusion` wires it, with a random-weight frozen VAE that
    encodes every step, or (`latents`) reading stored moments as training on latent shards does
    (`unet_stage.stored_latents`: the encoder leaves the step)."""
    vae = build_vae(cfg, env.device).eval().requires_grad_(False)  # as stages.load_vae leaves it
    model = build_diffusion_model(cfg, env.device)
    state = init_train_state(model, cfg.train.unet_lr, cfg.train.weight_decay, cfg.train.seed,
                             "fp32", env.device)
    objective = DiffusionObjective(model["unet"], None if cfg.text.frozen else model["text"],
                                   NoiseSchedule.from_config(cfg.schedule).to(env.device),
                                   cfg.schedule.prediction_type, cfg.train.snr_gamma,
                                   cfg.train.snr_floor)
    text_input = text_input_fn(cfg, model["text"], env.device)
    prompts = [PROMPT] * cfg.train.batch_size
    batch = {"tokens": tokenize(prompts, cfg.text.context_length), "prompt": prompts}  # as the loader
    if latents:
        encode, batch["moments"] = stored_latents(vae, env.device), random_moments(cfg, env.device)
    else:  # the VAE encodes every step
        encode, batch["image"] = latent_encoder(vae, env.device, cache=None), random_images(cfg, env.device)

    def make_step(settings: Any, objective: Callable) -> Callable:
        return functools.partial(
            diffusion_train_step, objective=objective, settings=settings, encode=encode,
            text_input=text_input, latent_shape=latent_shape(cfg),
            num_train_timesteps=cfg.schedule.num_train_timesteps, cond_drop=cfg.train.cond_drop)

    trained = model if not cfg.text.frozen else model["unet"]
    return Setup(state, objective, make_step, batch, cfg.train.unet_lr, cfg.train.unet_steps,
                 trained, "unet")


def compile_here(ctx: BenchContext) -> bool:
    """Inductor's C++ code generation for a whole CPU training step (forward and backward of
    the UNet, text tower, VAE encode and losses: hundreds of kernels, each a g++ run) took about
    10 minutes for the two stages on the shared 2-core machine, so on a CPU the compiled step is
    timed only with --slow-compile (or a capture-only backend)."""
    cheap = ctx.torch_device.type == "cuda" or ctx.compile_backend != "inductor"
    return ctx.compile and (cheap or ctx.slow_compile)


def variants(ctx: BenchContext) -> list[tuple[str, str, bool]]:
    """(row name, precision, compiled): fp32 eager first (the baseline)."""
    out = [("fp32 eager", "fp32", False)]
    if ctx.dtype == "bf16" or bf16_supported(ctx.torch_device):
        out.append(("bf16 eager", "bf16", False))
    if compile_here(ctx):
        out.append((f"{ctx.dtype} compiled", ctx.dtype, True))
    return out


def drivers(setup: Setup, cfg: Config, env: Env, ctx: BenchContext) -> dict[str, Callable]:
    """name -> no-argument function running one real train step. All variants advance one
    shared state (a one-slot cell: the step is pure, the cell is the caller's)."""
    cell = [setup.state]
    compiled = compile_fn(setup.objective, ctx)  # what stages.maybe_compile does, bench backend
    fns = {}
    for name, precision, is_compiled in variants(ctx):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        settings = step_settings(run_cfg, env, setup.stage, setup.lr, setup.total_steps)
        step = setup.make_step(settings, compiled if is_compiled else setup.objective)
        fns[name] = functools.partial(_advance, cell, step, setup.batch)
    return fns


def _advance(cell: list, step: Callable, batch: dict) -> dict:
    cell[0], metrics = step(cell[0], batch)
    return metrics


def time_stage(case: str, stage: str, ctx: BenchContext) -> list[dict]:
    cfg = bench_config(ctx, stage)
    env = Env(device=ctx.torch_device, world=distributed.World(), resume=False,
              show_progress=False)
    setup = diffusion_setup(cfg, env, ctx.latents) if stage == "unet" else vae_setup(cfg, env)
    fns = drivers(setup, cfg, env, ctx)
    batch_size = cfg.train.batch_size
    flops = count_flops(fns["fp32 eager"]) / batch_size  # one real eager step, also a warm-up
    first = {name: first_call_s(fns[name], ctx.torch_device)  # compiles forward and backward
             for name, _, is_compiled in variants(ctx) if is_compiled}
    repeats = ctx.repeats if ctx.torch_device.type == "cuda" else min(ctx.repeats, 10)
    stats = time_alternating(fns, ctx=ctx, repeats=repeats)
    rows = []
    for name, precision, is_compiled in variants(ctx):
        rows.append(result_row(
            case, name, stats[name], stage=stage, precision=precision,
            compile=ctx.compile_backend if is_compiled else "-", batch=batch_size,
            input=input_label(setup.batch), params_m=count_params(setup.trained) / 1e6,
            **throughput(stats[name], ctx=ctx, samples=batch_size, flops_per_sample=flops,
                         dtype=precision)))
        if name in first:
            rows[-1]["first_call_s"] = first[name]
    if ctx.compile and not compile_here(ctx):
        rows.append({"case": case, "name": f"{ctx.dtype} compiled",
                     "skipped": "CPU inductor compile of a whole step takes minutes; --slow-compile"})
    return add_step_ratios(rows, ctx)


def add_step_ratios(rows: list[dict], ctx: BenchContext) -> list[dict]:
    """`ratio`: fp32 eager time / this row's (every other row); `ratio_compiled`: eager time at
    the same precision / compiled time (the compiled row). Both from this one run."""
    by_name = {row["name"]: row for row in rows if "median_s" in row}
    base = by_name["fp32 eager"]
    for row in by_name.values():
        if row is not base:
            row["ratio"], row["ratio_vs"] = base["median_s"] / row["median_s"], base["name"]
        eager = by_name.get(f"{row['precision']} eager")
        if row["compile"] != "-" and eager is not None:
            row["ratio_compiled"] = eager["median_s"] / row["median_s"]
            row["ratio_compiled_vs"] = eager["name"]
    return rows


@register_case("train-step")
def train_step_case(ctx: BenchContext) -> list[dict]:
    return time_stage("train-step", "unet", ctx)


@register_case("train-step-vae")
def train_step_vae_case(ctx: BenchContext) -> list[dict]:
    return time_stage("train-step-vae", "vae", ctx)
