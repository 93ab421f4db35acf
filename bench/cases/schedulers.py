"""`schedulers`: one PNDM and one LMS step on a 1x4x64x64 latent, eager and compiled, and the peer
(diffusers' PNDMScheduler / LMSDiscreteScheduler) in the same interleaved run when importable.

Each step is timed at a steady-state position (step 5 of 50: full 4th-order history), where the
multistep work is largest. Our steps are pure, so the same state is stepped again every call;
the peer's mutable scheduler is held at the same position.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch

from bench.core import BenchContext, add_ratios, register_case, result_row, time_alternating
from t2i.schedulers import NoiseSchedule, lms, pndm

NUM_STEPS = 50
AT_STEP = 5  # steady state: every history slot is filled
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _fake_eps(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x)


def _advance(module: Any, state: Any, x: torch.Tensor) -> tuple[Any, torch.Tensor]:
    for _ in range(AT_STEP):
        x_in = module.scale_model_input(state, x)
        x, state = module.step(state, _fake_eps(x_in), x)
    return state, x


def _ours(ctx: BenchContext, module: Any, x: torch.Tensor, **options: Any) -> dict[str, Callable[[], Any]]:
    schedule = NoiseSchedule.create(**SCHEDULE)
    state = module.init(schedule, NUM_STEPS, shape=x.shape, device=x.device, dtype=x.dtype, **options)
    state, x = _advance(module, state, x * state.init_noise_sigma)
    eps = _fake_eps(x)
    fns = {"eager": lambda: module.step(state, eps, x)}
    if ctx.compile:
        compiled = torch.compile(module.step, fullgraph=True)
        fns["compiled"] = lambda: compiled(state, eps, x)
    return fns


def _peer(name: str, x: torch.Tensor) -> Callable[[], Any] | None:
    """The peer scheduler's `step`, held at step AT_STEP of NUM_STEPS."""
    if importlib.util.find_spec("diffusers") is None:
        return None
    import diffusers

    if name == "pndm":
        scheduler = diffusers.PNDMScheduler(**SCHEDULE, skip_prk_steps=True, steps_offset=1)
    else:
        scheduler = diffusers.LMSDiscreteScheduler(**SCHEDULE)
    scheduler.set_timesteps(NUM_STEPS, device=x.device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps[:AT_STEP]:
        x = scheduler.step(_fake_eps(scheduler.scale_model_input(x, t)), t, x).prev_sample
    t = scheduler.timesteps[AT_STEP]
    eps = _fake_eps(x)
    if name == "pndm":  # its history stays four long, so repeated calls are steady state
        return lambda: scheduler.step(eps, t, x)

    def lms_step() -> Any:
        scheduler._step_index = AT_STEP  # hold its position; derivatives stay four long
        return scheduler.step(eps, t, x)

    return lms_step


@register_case("schedulers")
def schedulers(ctx: BenchContext) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 64, 64, generator=generator).to(ctx.torch_device, ctx.torch_dtype)
    rows = []
    for name, module, options in (("pndm", pndm, dict(skip_prk_steps=True, steps_offset=1)),
                                  ("lms", lms, {})):
        fns = _ours(ctx, module, x, **options)
        peer = _peer(name, x)
        if peer is not None:
            fns["diffusers"] = peer
        stats = time_alternating(fns, ctx=ctx, inner=2 if ctx.quick else 5)
        group = [result_row("schedulers", f"{name} {variant}", s, sampler=name, variant=variant,
                            shape="1x4x64x64") for variant, s in stats.items()]
        if peer is not None:
            add_ratios(group, "diffusers", key="ratio", group="sampler", match="variant")
        if "compiled" in fns:
            add_ratios(group, "eager", key="ratio_compiled", group="sampler", match="variant")
            for row in group:  # only the compiled row's ratio to eager is meaningful
                if row["variant"] != "compiled":
                    row.pop("ratio_compiled", None), row.pop("ratio_compiled_vs", None)
        rows += group
    return rows
