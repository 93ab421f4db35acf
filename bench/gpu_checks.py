"""Correctness checks that need a GPU to mean anything, runnable anywhere:

  amp-bf16             UNet forward under bf16 autocast vs fp32, same weights and inputs
  sampler-fp32         the sampler step under bf16 autocast vs without: must be identical (the
                       step turns autocast off; CUDA autocast would run its torch.mv in bf16)
  compiled-eager       torch.compile'd UNet vs eager: forward output and parameter gradients
  graph-sampling       the real sampling loop (t2i.sample.denoise, PNDM and LMS, with guidance)
                       with the UNet compiled as `t2i-sample --compile` does (on CUDA captured as
                       CUDA graphs, mode "reduce-overhead") and also the step compiled, vs the
                       eager loop from the same noise; fp32
  graph-sampling-bf16  the same under bf16 autocast, with bf16 weights on CUDA as t2i-sample
                       holds them, vs the eager bf16 loop

Each check reports a relative L2 error ||a - b|| / ||b|| against a tolerance; a part that
crashes is reported as such and the other parts still run. On CUDA the fp32 runs use true fp32
matmuls (TF32 off) so that only the thing under test differs. `--checks` picks checks (the GPU
check runs the eager ones before any compile); with `--json` the file is rewritten after every
check, so a run stopped by a timeout keeps what it measured.

    python -m bench.gpu_checks --device cuda --preset small --json FILE
    python -m bench.gpu_checks --device cpu --preset tiny --steps 3 --compile-backend none  # smoke

Exit status 0 when every check passes, 1 otherwise (2 for bad input).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable

import click
import torch

from bench import core
from bench.__main__ import BACKENDS, BenchUsageError, resolve_device
from bench.cases.sample import SAMPLERS, build_unet, loop_fn, make_loop, modes
from t2i.config import PRESETS, Config, get_preset
from t2i.sample import sampler_module

# bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per op); through a deep UNet the
# output error reaches about 1e-2, and compiled bf16 code rounds at other places than eager.
# fp32 reorderings under compile stay near 1e-6. The sampler step must not change at all.
TOLERANCE = {"amp-bf16": 5e-2, "sampler-fp32": 0.0, "compiled-eager": 1e-3,
             "graph-sampling": 1e-3, "graph-sampling-bf16": 5e-2}
EAGER_CHECKS = ("amp-bf16", "sampler-fp32")
COMPILED_CHECKS = ("compiled-eager", "graph-sampling", "graph-sampling-bf16")


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


def check(name: str, errors: dict[str, float], crashed: dict[str, str] | None = None,
          **extra: Any) -> dict[str, Any]:
    """One result: the worst error over its parts, the tolerance and whether it passed (every
    part measured, none crashed, the worst within tolerance)."""
    crashed = crashed or {}
    worst = max(errors.values()) if errors else float("nan")
    out = {"check": name, "rel_l2": worst, "tolerance": TOLERANCE[name],
           "passed": bool(errors) and not crashed and worst <= TOLERANCE[name], "parts": errors,
           **extra}
    if crashed:
        out["error"] = "; ".join(f"{part}: {message}" for part, message in crashed.items())
    return out


def sampler_fp32(cfg: Config, ctx: core.BenchContext) -> dict[str, Any]:
    """Every sampler's step and input scaling under bf16 autocast equal the same calls without
    autocast, bit for bit, for a bf16 model output: the step runs in float32 with autocast off."""
    loop = make_loop(cfg, ctx, 2, 10, ctx.resolution or cfg.data.resolution)
    gen = torch.Generator().manual_seed(2)
    errors = {}
    for name in SAMPLERS:
        module, state, x = sampler_module(name), loop.states[name], loop.x[name]
        eps = torch.randn(x.shape, generator=gen).to(x.device, torch.bfloat16)
        for _ in range(3):  # into the multistep history
            x, state = module.step(state, eps, x)
        reference = module.step(state, eps, x)[0], module.scale_model_input(state, x)
        with torch.autocast(ctx.torch_device.type, dtype=torch.bfloat16):
            under = module.step(state, eps, x)[0], module.scale_model_input(state, x)
        for part, a, b in zip(("step", "scale_model_input"), under, reference):
            same = a.dtype == torch.float32 and torch.equal(a, b)
            errors[f"{name} {part}"] = 0.0 if same else max(rel_l2(a.float(), b), 1e-30)
    return check("sampler-fp32", errors)


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


def graph_sampling(cfg: Config, ctx: core.BenchContext, steps: int, dtype: str = "fp32"
                   ) -> dict[str, Any]:
    """Both compiled modes of the sample case: the UNet as t2i-sample --compile has it, and
    UNet + scheduler step; three calls each (on CUDA: warm-up, graph capture, replay), at
    `dtype` (bf16: autocast, and on CUDA bf16 weights as `t2i.sample.hold_weights` makes them).
    Each sampler and mode is tried on its own: one crash does not hide the others."""
    ctx = dataclasses.replace(ctx, dtype=dtype, compile=True)
    held = torch.bfloat16 if dtype == "bf16" and ctx.torch_device.type == "cuda" else torch.float32
    unet = build_unet(cfg, ctx.torch_device, held)
    loop = make_loop(cfg, ctx, 2, steps, ctx.resolution or cfg.data.resolution)
    parts = modes(unet, cfg, ctx)
    errors: dict[str, float] = {}
    crashed: dict[str, str] = {}
    for name in SAMPLERS:
        try:
            eager = loop_fn(unet, sampler_module(name), loop.states[name], loop, loop.x[name], ctx)()
        except Exception as err:  # noqa: BLE001 - reported; the other sampler still runs
            crashed[f"{name} eager"] = f"{type(err).__name__}: {err}"
            continue
        for mode in ("compiled", "compiled+step"):
            unet_c, samplers = parts[mode]
            graphed = loop_fn(unet_c, samplers[name], loop.states[name], loop, loop.x[name], ctx)
            try:
                for i in range(3):
                    errors[f"{name} {mode} call {i + 1}"] = rel_l2(graphed().clone(), eager)
            except Exception as err:  # noqa: BLE001 - reported; the other parts still run
                crashed[f"{name} {mode}"] = f"{type(err).__name__}: {err}"
    mode = "reduce-overhead" if ctx.torch_device.type == "cuda" else "default (no CUDA graphs)"
    name = "graph-sampling" if dtype == "fp32" else f"graph-sampling-{dtype}"
    return check(name, errors, crashed, mode=mode, steps=steps, batch=2,
                 weights=str(held).removeprefix("torch."))


def run_checks(ctx: core.BenchContext, steps: int, names: tuple[str, ...] = tuple(TOLERANCE),
               on_result: Callable[[list[dict[str, Any]]], None] = lambda results: None
               ) -> list[dict[str, Any]]:
    """The checks in `names` (in TOLERANCE's order); `on_result(results so far)` after each.
    Each starts from empty dynamo caches, as a fresh process would: the UNet's forward compiled
    by an earlier check at another batch would otherwise be recompiled with a dynamic batch
    dimension, which t2i-sample --compile never does (and which compiles slower)."""
    cfg = get_preset(ctx.preset)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    checks: dict[str, Callable[[], dict]] = {
        "amp-bf16": lambda: amp_bf16(cfg, ctx),
        "sampler-fp32": lambda: sampler_fp32(cfg, ctx),
        "compiled-eager": lambda: compiled_eager(cfg, ctx),
        "graph-sampling": lambda: graph_sampling(cfg, ctx, steps),
        "graph-sampling-bf16": lambda: graph_sampling(cfg, ctx, steps, "bf16"),
    }
    results = []
    for name in (n for n in TOLERANCE if n in names):
        torch._dynamo.reset()
        try:
            results.append(checks[name]())
        except Exception as err:  # noqa: BLE001 - a crashing check is a failed check, others run
            results.append({"check": name, "passed": False, "error": f"{type(err).__name__}: {err}"})
        on_result(results)
    return results


def format_results(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        verdict = "PASS" if r["passed"] else "FAIL"
        if r.get("parts"):
            parts = ", ".join(f"{k} {v:.2e}" for k, v in r["parts"].items())
            lines.append(f"{verdict}  {r['check']:<19} rel_l2 {r['rel_l2']:.2e} "
                         f"<= {r['tolerance']:.0e}?  ({parts})")
        if "error" in r:
            lines.append(f"{verdict}  {r['check']:<19} {r['error']}")
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
@click.option("--checks", "selection", default="all", show_default=True,
              help="Comma-separated checks, or all | eager (no compiling) | compiled: "
                   + ", ".join(TOLERANCE) + ".")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rewritten after every check.")
def main(device: str, preset: str, resolution: int | None, steps: int, compile_backend: str,
         selection: str, json_path: Path | None) -> None:
    """GPU correctness checks: AMP bf16 vs fp32, the sampler step in fp32, compiled vs eager,
    CUDA-graph sampling vs eager (fp32 and bf16)."""
    if preset not in PRESETS:
        raise BenchUsageError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    names = select_checks(selection)
    ctx = core.BenchContext(preset=preset, device=resolve_device(device), resolution=resolution,
                            compile_backend=compile_backend)
    env = core.environment(dataclasses.replace(ctx, compile=True))

    def write(results: list[dict[str, Any]]) -> None:
        if json_path:
            core.write_json(json_path, {"environment": env, "checks": results,
                                        "compile_times": core.compile_phase_times()})

    results = run_checks(ctx, steps, names, on_result=write)
    click.echo(format_results(results))
    if json_path:
        click.echo(f"wrote {json_path}")
    sys.exit(0 if all(r["passed"] for r in results) else 1)


def select_checks(selection: str) -> tuple[str, ...]:
    groups = {"all": tuple(TOLERANCE), "eager": EAGER_CHECKS, "compiled": COMPILED_CHECKS}
    if selection in groups:
        return groups[selection]
    names = tuple(n.strip() for n in selection.split(",") if n.strip())
    unknown = [n for n in names if n not in TOLERANCE]
    if unknown or not names:
        raise BenchUsageError(f"unknown check {unknown[0] if unknown else selection!r}; choose "
                              f"all, eager, compiled or some of {', '.join(TOLERANCE)}")
    return names


if __name__ == "__main__":
    main()
