"""Correctness checks that need a GPU to mean anything, runnable anywhere:

  amp-bf16        UNet forward under bf16 autocast vs fp32, same weights and inputs
  compiled-eager  torch.compile'd UNet vs eager: forward output and parameter gradients
  graph-sampling  the real sampling loop (t2i.sample.denoise, PNDM and LMS, with guidance)
                  with the UNet and scheduler step compiled and, on CUDA, captured as CUDA
                  graphs (mode "reduce-overhead") vs the eager loop from the same noise

Each check reports a relative L2 error ||a - b|| / ||b|| against a tolerance. On CUDA the
fp32 runs use true fp32 matmuls (TF32 off) so that only the thing under test differs.

    python -m bench.gpu_checks --device cuda --preset small --json FILE
    python -m bench.gpu_checks --device cpu --preset tiny --steps 3 --compile-backend eager  # smoke

Exit status 0 when every check passes, 1 otherwise (2 for bad input).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click
import torch

from bench import core
from bench.__main__ import BACKENDS, BenchUsageError, _resolve_device
from bench.cases.sample import SAMPLERS, build_unet, loop_fn, make_loop, modes
from t2i.config import PRESETS, Config, get_preset
from t2i.sample import sampler_module

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); through a deep UNet the
# output error reaches about 1e-2. fp32 reorderings under compile stay near 1e-6.
TOLERANCE = {"amp-bf16": 5e-2, "compiled-eager": 1e-3, "graph-sampling": 1e-3}


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def unet_inputs(cfg: Config, ctx: core.BenchContext, batch: int) -> tuple[torch.Tensor, ...]:
    res = (ctx.resolution or cfg.data.resolution) // cfg.vae.downsample_factor
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.unet.in_channels, res, res, generator=gen)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (batch,), generator=gen)
    context = torch.randn(batch, cfg.text.context_length, cfg.unet.context_dim, generator=gen)
    return tuple(a.to(ctx.torch_device) for a in (x, t, context))


def check(name: str, errors: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One result: the worst error over its parts, the tolerance and whether it passed."""
    worst = max(errors.values())
    return {"check": name, "rel_l2": worst, "tolerance": TOLERANCE[name],
            "passed": worst <= TOLERANCE[name], "parts": errors, **extra}


def amp_bf16(cfg: Config, ctx: core.BenchContext) -> dict[str, Any]:
    unet = build_unet(cfg, ctx.torch_device)
    inputs = unet_inputs(cfg, ctx, 2)
    with torch.no_grad():
        reference = unet(*inputs)
        with torch.autocast(ctx.torch_device.type, dtype=torch.bfloat16):
            low = unet(*inputs)
    return check("amp-bf16", {"unet forward": rel_l2(low.float(), reference)},
                 dtype=str(low.dtype))


def forward_and_grads(unet: Callable, params: list[torch.nn.Parameter], inputs: tuple
                      ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = unet(*inputs)
    grads = torch.autograd.grad(out.float().square().mean(), params)
    return out.detach(), list(grads)


def compiled_eager(cfg: Config, ctx: core.BenchContext) -> dict[str, Any]:
    unet = build_unet(cfg, ctx.torch_device).requires_grad_(True)
    params = list(unet.parameters())
    inputs = unet_inputs(cfg, ctx, 2)
    out, grads = forward_and_grads(unet, params, inputs)
    compiled = core.compile_fn(unet, ctx, fullgraph=True)
    out_c, grads_c = forward_and_grads(compiled, params, inputs)
    grad_error = rel_l2(torch.cat([g.flatten() for g in grads_c]),
                        torch.cat([g.flatten() for g in grads]))
    return check("compiled-eager", {"unet forward": rel_l2(out_c, out), "unet grads": grad_error},
                 backend=ctx.compile_backend)


def graph_sampling(cfg: Config, ctx: core.BenchContext, steps: int) -> dict[str, Any]:
    """Both compiled modes of the sample case: the UNet as t2i-sample --compile has it, and
    UNet + scheduler step; three calls each (on CUDA: warm-up, graph capture, replay)."""
    unet = build_unet(cfg, ctx.torch_device)
    loop = make_loop(cfg, ctx, 2, steps, ctx.resolution or cfg.data.resolution)
    parts = modes(unet, cfg, dataclasses.replace(ctx, compile=True))
    errors = {}
    for name in SAMPLERS:
        eager = loop_fn(unet, sampler_module(name), loop.states[name], loop, loop.x[name], ctx)()
        for mode in ("compiled", "compiled+step"):
            unet_c, samplers = parts[mode]
            graphed = loop_fn(unet_c, samplers[name], loop.states[name], loop, loop.x[name], ctx)
            results = [graphed().clone() for _ in range(3)]
            errors.update({f"{name} {mode} call {i + 1}": rel_l2(r, eager)
                           for i, r in enumerate(results)})
    mode = "reduce-overhead" if ctx.torch_device.type == "cuda" else "default (no CUDA graphs)"
    return check("graph-sampling", errors, mode=mode, steps=steps, batch=2)


def run_checks(ctx: core.BenchContext, steps: int) -> list[dict[str, Any]]:
    cfg = get_preset(ctx.preset)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    checks: list[tuple[str, Callable[[], dict]]] = [
        ("amp-bf16", lambda: amp_bf16(cfg, ctx)),
        ("compiled-eager", lambda: compiled_eager(cfg, ctx)),
        ("graph-sampling", lambda: graph_sampling(cfg, ctx, steps)),
    ]
    results = []
    for name, fn in checks:
        try:
            results.append(fn())
        except Exception as err:  # noqa: BLE001 - a crashing check is a failed check, others run
            results.append({"check": name, "passed": False, "error": f"{type(err).__name__}: {err}"})
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        verdict = "PASS" if r["passed"] else "FAIL"
        if "error" in r:
            lines.append(f"{verdict}  {r['check']:<15} {r['error']}")
            continue
        parts = ", ".join(f"{k} {v:.2e}" for k, v in r["parts"].items())
        lines.append(f"{verdict}  {r['check']:<15} rel_l2 {r['rel_l2']:.2e} "
                     f"<= {r['tolerance']:.0e}?  ({parts})")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--preset", default="small", show_default=True)
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="Image side (default: the preset's).")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Sampling steps in graph-sampling.")
@click.option("--compile-backend", type=click.Choice(BACKENDS), default="inductor", show_default=True,
              help="none: no compiling (a smoke run of the plumbing; the compiled sides are eager).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(device: str, preset: str, resolution: int | None, steps: int, compile_backend: str,
         json_path: Path | None) -> None:
    """GPU correctness checks: AMP bf16 vs fp32, compiled vs eager, CUDA-graph sampling vs eager."""
    if preset not in PRESETS:
        raise BenchUsageError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    ctx = core.BenchContext(preset=preset, device=_resolve_device(device), resolution=resolution,
                            compile_backend=compile_backend)
    results = run_checks(ctx, steps)
    click.echo(format_results(results))
    if json_path:
        env = core.environment(dataclasses.replace(ctx, compile=True))
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"environment": env, "checks": results}, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
    sys.exit(0 if all(r["passed"] for r in results) else 1)


if __name__ == "__main__":
    main()
