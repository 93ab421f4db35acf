"""`sample`: the real sampling loop (`t2i.sample.denoise` with `guided_model_output`), PNDM vs
LMS.

50 steps with classifier-free guidance (one batched UNet call of 2B rows per step), batch 1 and
16 (tiny preset on CPU, `--preset small` or `base` on CUDA), in three modes:
  eager          as `t2i-sample` runs without --compile;
  compiled       the UNet as `t2i-sample --compile` compiles it (`t2i.sample.compile_pipeline`:
                 fullgraph, and CUDA graphs via mode "reduce-overhead" on CUDA);
  compiled+step  also the scheduler step and `scale_model_input` under torch.compile
                 (`t2i.sample.compile_sampler`: fullgraph, never CUDA graphs).
The UNet has random weights from the preset: the loop's cost does not depend on the values.
With `--dtype bf16` on CUDA the UNet holds bf16 weights, as `t2i.sample.hold_weights` makes
`t2i-sample` do (`--fp32-weights`: keep them fp32 and let autocast cast them at every call).

Overhead outside the UNet: in the same interleaved run, `unet alone` makes the same number of
UNet calls on the same (2B, C, h, w) inputs and nothing else. A loop row's `overhead_share` is
1 - (UNet time for its calls) / (loop time): the scheduler step, `scale_model_input`, the
guidance arithmetic, the cat/chunk of the two halves and Python dispatch. Goal: under 2%.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch

from bench.core import (BenchContext, compile_fn, first_call_s, preset_config, register_case,
                        result_row, time_alternating)
from t2i.config import Config
from t2i.models.summary import count_params
from t2i.models.unet import UNet
from t2i.models.text import tokenize
from t2i.sample import (Pipeline, autocast, compile_pipeline, compile_sampler, denoise, generate,
                        sampler_module, sampler_state)
from t2i.schedulers import NoiseSchedule

SAMPLERS = ("pndm", "lms")
GUIDANCE = 7.5


@dataclasses.dataclass(frozen=True)
class Loop:
    """The loop's inputs for one batch size: latents, text states, scheduler states."""

    x: dict[str, torch.Tensor]  # sampler -> initial latents (B, C, h, w), scaled by init sigma
    states: dict[str, Any]  # sampler -> initial scheduler state
    cond: torch.Tensor  # (B, L, D)
    uncond: torch.Tensor  # (B, L, D)


def build_unet(cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32
               ) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet(cfg.unet)
        for param in unet.parameters():  # zero-initialised output conv: give it weights too
            if param.ndim > 1 and not param.any():
                torch.nn.init.normal_(param, std=0.02)
    return unet.to(device, dtype).eval().requires_grad_(False)


def inference_weights(ctx: BenchContext) -> torch.dtype:
    """bf16 where t2i-sample holds bf16 weights (CUDA, bf16), unless --fp32-weights."""
    held = ctx.torch_device.type == "cuda" and ctx.dtype == "bf16" and not ctx.fp32_weights
    return torch.bfloat16 if held else torch.float32


def make_loop(cfg: Config, ctx: BenchContext, batch: int, steps: int, res: int) -> Loop:
    """Scheduler states as `t2i.sample.init_sampler` makes them (its spacing, fp32 state)."""
    f = cfg.vae.downsample_factor
    shape = (batch, cfg.vae.z_channels, res // f, res // f)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=gen).to(ctx.torch_device)
    context = (batch, cfg.text.context_length, cfg.unet.context_dim)
    cond = torch.randn(context, generator=gen).to(ctx.torch_device)
    uncond = torch.randn(context[1:], generator=gen).to(ctx.torch_device).expand(context)
    schedule = NoiseSchedule.from_config(cfg.schedule)
    states = {name: sampler_state(schedule, name, steps, 1.0, shape, ctx.torch_device)
              for name in SAMPLERS}
    return Loop({name: noise * state.init_noise_sigma for name, state in states.items()},
                states, cond, uncond)


def compiled_unet(unet: torch.nn.Module, cfg: Config, ctx: BenchContext) -> Callable:
    """The UNet exactly as `t2i-sample --compile` compiles it, or under the bench's backend
    when a smoke run asks for another one."""
    if ctx.compile_backend != "inductor":
        return compile_fn(unet, ctx, fullgraph=True)
    pipe = Pipeline(cfg=cfg, vae=None, unet=unet, text=None, device=ctx.torch_device,
                    source=Path("bench"))  # compile_pipeline reads the UNet and device only
    return compile_pipeline(pipe).unet


def compiled_samplers(ctx: BenchContext) -> dict[str, Any]:
    """Each sampler's step and scale_model_input as `t2i.sample.compile_sampler` compiles them
    (fullgraph, no CUDA graphs), or not at all for --compile-backend none; a namespace with the
    two functions stands in for the sampler module in `denoise`."""
    if ctx.compile_backend == "none":
        return {name: sampler_module(name) for name in SAMPLERS}
    return {name: compile_sampler(name, ctx.compile_backend) for name in SAMPLERS}


def modes(unet: torch.nn.Module, cfg: Config, ctx: BenchContext) -> dict[str, tuple[Callable, dict]]:
    """mode -> (UNet, samplers): eager, then with compile on, compiled and compiled+step."""
    eager = {name: sampler_module(name) for name in SAMPLERS}
    out = {"eager": (unet, eager)}
    if ctx.compile:
        unet_c = compiled_unet(unet, cfg, ctx)
        out.update({"compiled": (unet_c, eager), "compiled+step": (unet_c, compiled_samplers(ctx))})
    return out


def _autocast(ctx: BenchContext):
    return torch.autocast(ctx.torch_device.type, dtype=torch.bfloat16, enabled=ctx.dtype == "bf16")


def loop_fn(unet: Callable, sampler: Any, state: Any, loop: Loop, x: torch.Tensor, ctx: BenchContext
            ) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad(), _autocast(ctx):
            return denoise(unet, sampler, state, x, loop.cond, loop.uncond, GUIDANCE)
    return run


def longest(loop: Loop) -> torch.Tensor:
    """The timesteps of the sampler that makes the most UNet calls (PNDM: 51 for 50 steps)."""
    return max((state.timesteps for state in loop.states.values()), key=len)


def unet_alone_fn(unet: Callable, loop: Loop, ctx: BenchContext) -> Callable[[], torch.Tensor]:
    """The UNet calls of the longest loop on the inputs guided_model_output builds, nothing
    around them."""
    x = loop.x["pndm"]
    b = x.shape[0]
    x2 = torch.cat([x, x])  # (2B, C, h, w)
    context = torch.cat([loop.uncond, loop.cond])  # (2B, L, D)
    timesteps = longest(loop)

    def run() -> torch.Tensor:
        with torch.no_grad(), _autocast(ctx):
            for t in timesteps:
                out = unet(x2, t.expand(2 * b), context)
        return out
    return run


def alone_mode(mode: str) -> str:
    """compiled+step shares the compiled UNet, so it shares its UNet-alone baseline."""
    return "compiled" if mode == "compiled+step" else mode


def variant_fns(unet: Callable, samplers: dict, loop: Loop, mode: str, ctx: BenchContext
                ) -> dict[str, Callable]:
    fns = {f"{name} {mode}": loop_fn(unet, samplers[name], loop.states[name], loop, loop.x[name], ctx)
           for name in SAMPLERS}
    if alone_mode(mode) == mode:
        fns[f"unet alone {mode}"] = unet_alone_fn(unet, loop, ctx)
    return fns


def batch_rows(stats: dict, loop: Loop, batch: int, steps: int, mode_names: list[str]
               ) -> list[dict]:
    """One row per (sampler, mode) plus the UNet-alone rows; overhead and compiled ratios."""
    rows = []
    for mode in mode_names:
        alone = stats[f"unet alone {alone_mode(mode)}"]
        per_call = alone["median_s"] / len(longest(loop))
        for name in SAMPLERS:
            calls = len(loop.states[name].timesteps)
            s = stats[f"{name} {mode}"]
            row = result_row("sample", f"{name} b{batch} {mode}", s, sampler=name, mode=mode,
                             batch=batch, steps=steps, unet_calls=calls,
                             images_per_s=batch / s["median_s"],
                             s_per_image=s["median_s"] / batch,
                             overhead_share=1 - per_call * calls / s["median_s"])
            eager = stats.get(f"{name} eager")
            if mode != "eager" and eager is not None:
                row["ratio"], row["ratio_vs"] = eager["median_s"] / s["median_s"], f"{name} b{batch} eager"
            rows.append(row)
        if alone_mode(mode) == mode:
            rows.append(result_row("sample", f"unet alone b{batch} {mode}", alone, mode=mode,
                                   batch=batch, steps=steps, unet_calls=len(longest(loop))))
    return rows


def batches(ctx: BenchContext) -> tuple[int, ...]:
    if ctx.batch:
        return (ctx.batch,)
    return (1, 2) if ctx.quick else (1, 16)


def time_loops(fns: dict[str, Callable], ctx: BenchContext) -> dict[str, dict]:
    """time_alternating for whole sampling loops: a 50-step loop is seconds on a CPU, so fewer
    rounds there (the medians stay stable)."""
    cuda = ctx.torch_device.type == "cuda"
    return time_alternating(fns, ctx=ctx, repeats=ctx.repeats if cuda else min(ctx.repeats, 5),
                            warmup=ctx.warmup if cuda else min(ctx.warmup, 1))


PROMPT = "a photograph of a red fox standing in fresh snow"


def build_pipeline(cfg: Config, ctx: BenchContext, unet: torch.nn.Module, res: int) -> Pipeline:
    """t2i-sample's pipeline around `unet`, with a random-weight VAE and text tower of the
    preset (the weights do not change the cost; no download), at `res` pixels."""
    from t2i.models.text import build_text_encoder
    from t2i.models.vae import VAE

    text_cfg = dataclasses.replace(cfg.text, pretrained="", weights="")
    run_cfg = dataclasses.replace(cfg, text=text_cfg,
                                  data=dataclasses.replace(cfg.data, resolution=res))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        vae, text = VAE(cfg.vae), build_text_encoder(text_cfg, load_weights=False)
    vae, text = (m.to(ctx.torch_device).eval().requires_grad_(False) for m in (vae, text))
    return Pipeline(cfg=run_cfg, vae=vae, unet=unet, text=text, device=ctx.torch_device,
                    source=Path("bench"))


def pipeline_rows(cfg: Config, ctx: BenchContext, unet: torch.nn.Module, parts: dict, res: int,
                  steps: int) -> list[dict]:
    """`t2i.sample.generate` end to end (tokenize, text tower, the guided loop, VAE decode,
    uint8 images), as `t2i-sample` runs it eager and with --compile (the compiled UNet of the
    loop rows: no second compile), beside the text encode and the VAE decode alone."""
    batch = ctx.batch or 1
    pipe = build_pipeline(cfg, ctx, unet, res)
    precision = "bf16" if ctx.dtype == "bf16" else "fp32"
    options = dict(steps=steps, guidance=GUIDANCE, batch_size=batch, precision=precision)
    prompts = [PROMPT] * batch
    fns = {f"generate b{batch} eager": lambda: generate(pipe, prompts, **options)}
    if "compiled" in parts:
        compiled = dataclasses.replace(pipe, unet=parts["compiled"][0], compiled=True)
        fns[f"generate b{batch} compiled"] = lambda: generate(compiled, prompts, **options)
    tokens = tokenize(prompts, cfg.text.context_length).to(ctx.torch_device)
    f = cfg.vae.downsample_factor
    z = torch.randn(batch, cfg.vae.z_channels, res // f, res // f, device=ctx.torch_device)

    def encode() -> torch.Tensor:
        with torch.no_grad(), autocast(ctx.torch_device, precision):
            return pipe.text(tokens)[0]

    def decode() -> torch.Tensor:
        with torch.no_grad():  # generate decodes in float32, outside autocast
            return pipe.vae.decode(z)

    fns.update({f"text encode b{batch}": encode, f"vae decode b{batch}": decode})
    first = {name: first_call_s(fn, ctx.torch_device) for name, fn in fns.items()
             if "compiled" in name}
    stats = time_loops(fns, ctx)
    rows = []
    for name, s in stats.items():
        loop = {"mode": name.split()[-1], "steps": steps} if "generate" in name else {"mode": "eager"}
        row = result_row("sample", name, s, **loop, batch=batch,
                         images_per_s=batch / s["median_s"], s_per_image=s["median_s"] / batch)
        if name in first:
            row["first_call_s"] = first[name]
        rows.append(row)
    eager = stats[f"generate b{batch} eager"]["median_s"]
    for row in rows:
        if row["name"] == f"generate b{batch} compiled":
            row["ratio"], row["ratio_vs"] = eager / row["median_s"], f"generate b{batch} eager"
    return rows


@register_case("sample")
def sample_case(ctx: BenchContext) -> list[dict]:
    cfg = preset_config(ctx)
    res = ctx.resolution or cfg.data.resolution
    steps = 5 if ctx.quick else 50
    unet = build_unet(cfg, ctx.torch_device, inference_weights(ctx))
    parts = modes(unet, cfg, ctx)
    rows = []
    for batch in batches(ctx):
        loop = make_loop(cfg, ctx, batch, steps, res)
        fns = {}
        for mode, (unet_m, samplers) in parts.items():
            fns.update(variant_fns(unet_m, samplers, loop, mode, ctx))
        first = {}  # name -> its first call: the compile (the first variant of a mode pays it)
        for name, fn in fns.items():  # compile, then (CUDA) record the graphs: untimed
            if "compiled" in name:
                first[name] = first_call_s(fn, ctx.torch_device)
                fn()
        stats = time_loops(fns, ctx)
        for row in batch_rows(stats, loop, batch, steps, list(parts)):
            name = row["name"].replace(f" b{batch} ", " ")  # back to its key in fns
            rows.append({**row, **({"first_call_s": first[name]} if name in first else {})})
    if not ctx.fp32_weights:  # t2i-sample always holds 16-bit weights on CUDA: no such rows
        rows += pipeline_rows(cfg, ctx, unet, parts, res, steps)
    latent = res // cfg.vae.downsample_factor
    for row in rows:
        row.update(params_m=count_params(unet) / 1e6, guidance=GUIDANCE,
                   latent=f"{cfg.vae.z_channels}x{latent}x{latent}",
                   weights=str(inference_weights(ctx)).removeprefix("torch."))
    return rows
