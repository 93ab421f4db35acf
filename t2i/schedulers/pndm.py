"""PNDM sampler (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds").

Every model call is followed by one application of the transfer part (eq. 11)

    phi(x_t, eps, t, t') = sqrt(ab_t' / ab_t) x_t
                           - (ab_t' - ab_t) / (sqrt(ab_t) (sqrt((1 - ab_t') ab_t) + sqrt((1 - ab_t) ab_t'))) eps

(ab = alpha_bar) to a combination of stored eps: pseudo Runge-Kutta stages (eq. 13, PRK warm-up)
or the 4th-order linear multistep formula (eq. 12, PLMS) with its usual lower-order start.

Which eps are combined, which sample is transferred and between which timesteps depends only on
the step counter, so `init` folds it all into one table (computed in float64) with one row per
model call: step i is a single weighted sum over a fixed window of current and past eps and
samples. Nothing branches on tensor values, the history has a fixed shape (a shift register),
and a compiled `step` never recompiles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from t2i.schedulers._common import (check_plan, check_step_inputs, compute_dtype, float32_region,
                                    start_index, table_row, timestep_grid, to_device,
                                    with_past_the_end_row)
from t2i.schedulers.schedule import PREDICTION_TYPES, NoiseSchedule

PLMS_WEIGHTS = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12],
                4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}  # eq. 12 and its lower-order starts
C_MODEL, C_INPUT, W0 = 0, 1, 2  # table columns: v -> eps conversion, then the window weights


@dataclass(frozen=True, eq=False)
class PNDMState:
    """Sampler state: constant tables from `init` plus the tensors `step` advances.

    Step i forms the window [eps_i, eps_{i-1}, ..., eps_{i-D}, x_i, x_{i-1}, ..., x_{i-S}] of the
    current and past model outputs (as eps) and inputs, and returns one weighted sum of it: the
    PRK/PLMS combination and the transfer of eq. 11 folded into row i of `coefficients`.
    """

    timesteps: torch.Tensor  # (N,) int64: the timestep of every model call, in order
    coefficients: torch.Tensor  # (N + 1, 2 + D + S + 2): [c_model, c_input, window weights]; NaN last row
    step_index: torch.Tensor  # () int64: calls done so far
    eps_history: torch.Tensor  # (D, *shape) eps of the last D calls, newest first
    sample_history: torch.Tensor  # (S, *shape) inputs of the last S calls, newest first
    prediction_type: str = "epsilon"
    init_noise_sigma: float = 1.0
    start_alpha_bar: float = 1.0  # alpha_bar at timesteps[0], for `add_noise` (img2img start)


def transfer_coefficients(alpha_bar: float, alpha_bar_next: float) -> tuple[float, float]:
    """(sample coefficient, eps coefficient) of phi in eq. 11, in float64."""
    eps_coef = (alpha_bar_next - alpha_bar) / (
        alpha_bar**0.5 * (((1 - alpha_bar_next) * alpha_bar) ** 0.5 + ((1 - alpha_bar) * alpha_bar_next) ** 0.5))
    return (alpha_bar_next / alpha_bar) ** 0.5, eps_coef


def _plms_call(i: int, t: int, stored: list[int]) -> dict:
    """A PLMS call: store this eps, combine the last (up to) four stored eps by eq. 12."""
    stored.append(i)
    used = stored[::-1][:4]
    return dict(t=t, x_from=i, eps=list(zip(used, PLMS_WEIGHTS[len(used)])))


def _plms_plan(grid: list[int]) -> list[dict]:
    """PLMS only (skip_prk_steps=True): one call per timestep, except that the first interval is
    redone with the average of the eps at both of its ends (a 2nd-order start, as in the reference).
    Each call is {t: model timestep, x_from: call whose input is transferred, eps: [(call, weight)]}."""
    stored: list[int] = []
    calls = [_plms_call(0, grid[0], stored)]
    if len(grid) > 1:
        calls.append(dict(t=grid[1], x_from=0, eps=[(1, 0.5), (0, 0.5)]))  # not stored
        calls += [_plms_call(i, t, stored) for i, t in enumerate(grid[1:], start=2)]
    return calls


def _prk_plan(grid: list[int], half_stride: int) -> list[dict]:
    """Three pseudo Runge-Kutta steps over grid[0..3] (eq. 13: stages at t, t - delta/2 (twice) and
    t - delta, combined 1/6, 1/3, 1/3, 1/6), then 4th-order PLMS for the rest."""
    if len(grid) < 4:
        raise ValueError(f"PNDM with Runge-Kutta warm-up (skip_prk_steps=False) needs at least 4 "
                         f"inference steps to run, got {len(grid)}; use more steps or skip_prk_steps=True")
    calls: list[dict] = []
    stored: list[int] = []
    for t, t_next in zip(grid[:3], grid[1:4]):
        i = len(calls)
        stored.append(i)  # the reference keeps the first stage's eps for PLMS
        # where the reference calls the model for the midpoint stages; for an odd stride it
        # moves the sample to t - stride // 2, one step off that call: we move it to the call
        # (~5e-3 from diffusers at 9 steps, 1e-6 where the stride is even)
        mid = t_next + half_stride
        calls += [dict(t=t, x_from=i, eps=[(i, 1.0)]),
                  dict(t=mid, x_from=i, eps=[(i + 1, 1.0)]),
                  dict(t=mid, x_from=i, eps=[(i + 2, 1.0)]),
                  dict(t=t_next, x_from=i, eps=[(i, 1 / 6), (i + 1, 1 / 3), (i + 2, 1 / 3), (i + 3, 1 / 6)])]
    calls += [_plms_call(i, t, stored) for i, t in enumerate(grid[3:], start=len(calls))]
    return calls


def _table(calls: list[dict], alphas_cumprod: np.ndarray, final_alpha_bar: float,
           prediction_type: str) -> tuple[np.ndarray, int, int]:
    """(rows, D, S): one float64 row per call. Every call transfers to the timestep of the next
    call, the last one to the final alpha_bar (deviation: the reference steps by the fixed stride
    T // n instead, which misses the next timestep for linspace/trailing spacing)."""
    depth = max(1, max(i - j for i, c in enumerate(calls) for j, _ in c["eps"]))  # D
    sample_depth = max(1, max(i - c["x_from"] for i, c in enumerate(calls)))  # S
    rows = np.zeros((len(calls), W0 + depth + sample_depth + 2))
    for i, call in enumerate(calls):
        alpha_bar_model = alphas_cumprod[call["t"]]
        # deviation: v is turned into eps at its own timestep and input, before any combining
        rows[i, C_MODEL], rows[i, C_INPUT] = ((alpha_bar_model**0.5, (1 - alpha_bar_model) ** 0.5)
                                              if prediction_type == "v_prediction" else (1.0, 0.0))
        alpha_bar_next = alphas_cumprod[calls[i + 1]["t"]] if i + 1 < len(calls) else final_alpha_bar
        c_sample, c_eps = transfer_coefficients(alphas_cumprod[calls[call["x_from"]]["t"]], alpha_bar_next)
        for j, weight in call["eps"]:
            rows[i, W0 + i - j] -= c_eps * weight
        rows[i, W0 + depth + 1 + i - call["x_from"]] = c_sample
    return rows, depth, sample_depth


def init(schedule: NoiseSchedule, num_inference_steps: int = 50, *, skip_prk_steps: bool = True,
         set_alpha_to_one: bool = False, steps_offset: int = 0, timestep_spacing: str = "leading",
         prediction_type: str | None = None, strength: float = 1.0, shape: tuple[int, ...] | torch.Size,
         device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> PNDMState:
    """Plan a PNDM run of `num_inference_steps` for samples of `shape` and `dtype`.

    `strength` < 1 starts part-way (img2img): only the last int(n * strength) grid timesteps are
    run, with a fresh warm-up; noise the clean latent with `add_noise(state, x0, noise)`.
    `prediction_type` defaults to the schedule's.
    """
    grid = inference_grid(schedule, num_inference_steps, timestep_spacing, steps_offset, strength)
    half_stride = schedule.num_train_timesteps // num_inference_steps // 2
    calls = _plms_plan(grid) if skip_prk_steps else _prk_plan(grid, half_stride)
    return build_state(schedule, calls, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type,
                       shape=shape, device=device, dtype=dtype)


def inference_grid(schedule: NoiseSchedule, num_inference_steps: int, timestep_spacing: str,
                   steps_offset: int, strength: float) -> list[int]:
    """Integer timesteps of the run, high noise first, from the img2img start on."""
    grid = timestep_grid(schedule.num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset)
    return [int(t) for t in grid[start_index(num_inference_steps, strength):]]


def build_state(schedule: NoiseSchedule, calls: list[dict], *, set_alpha_to_one: bool,
                prediction_type: str | None, shape: tuple[int, ...] | torch.Size,
                device: torch.device | str | None, dtype: torch.dtype) -> PNDMState:
    """Tables and zeroed history for a planned list of calls (shared with DDIM)."""
    prediction_type = prediction_type or schedule.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    alphas_cumprod = schedule.alphas_cumprod.cpu().numpy()
    final_alpha_bar = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
    table, depth, sample_depth = _table(calls, alphas_cumprod, final_alpha_bar, prediction_type)
    timesteps = np.array([c["t"] for c in calls])
    check_plan("pndm", timesteps, table, schedule.num_train_timesteps)
    work = compute_dtype(dtype)  # float64 coefficients, cast once to the arithmetic dtype
    shape = tuple(shape)
    return PNDMState(
        timesteps=to_device(timesteps, device, torch.int64),
        coefficients=to_device(with_past_the_end_row(table), device, work),
        step_index=torch.zeros((), device=device, dtype=torch.int64),
        eps_history=torch.zeros((depth, *shape), device=device, dtype=work),
        sample_history=torch.zeros((sample_depth, *shape), device=device, dtype=work),
        prediction_type=prediction_type, start_alpha_bar=float(alphas_cumprod[calls[0]["t"]]),
    )


@float32_region
def scale_model_input(state: PNDMState, sample: torch.Tensor) -> torch.Tensor:
    """PNDM feeds the sample to the model unscaled."""
    return sample


def add_noise(state: PNDMState, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Noise a clean latent to the first timestep of the run (img2img start), float64 coefficients."""
    return (state.start_alpha_bar**0.5) * x0 + ((1 - state.start_alpha_bar) ** 0.5) * noise


def check(state: PNDMState, model_output: torch.Tensor, sample: torch.Tensor) -> None:
    """Raise a clear error for a misused `step` (wrong shape, dtype or device; past the end)."""
    check_step_inputs("pndm", state.eps_history, state.step_index, state.timesteps.shape[0],
                      model_output, sample)


@float32_region
def step(state: PNDMState, model_output: torch.Tensor,
         sample: torch.Tensor) -> tuple[torch.Tensor, PNDMState]:
    """One PNDM update (eqs. 11-13 folded into row i of the table): (prev_sample, new_state).
    Pure, free of host syncs, and graph-safe under torch.compile(fullgraph=True), where the eager
    `check` is skipped. Runs in the state's dtype (float32 for 16-bit samples) with autocast off."""
    if not torch.compiler.is_compiling():
        check(state, model_output, sample)
    row = table_row(state.coefficients, state.step_index)  # (2 + D + S + 2,)
    model_output, x = model_output.to(row.dtype), sample.to(row.dtype)  # exact for 16-bit inputs
    eps = (model_output if state.prediction_type == "epsilon"
           else row[C_MODEL] * model_output + row[C_INPUT] * x)
    window = torch.cat([eps[None], state.eps_history, x[None], state.sample_history])  # (D+S+2, *shape)
    prev_sample = torch.mv(window.flatten(1).t(), row[W0:]).view(sample.shape)  # (*shape)
    depth, sample_depth = state.eps_history.shape[0], state.sample_history.shape[0]
    new_state = dataclasses.replace(
        state, step_index=state.step_index + 1,
        eps_history=window[:depth],  # views: the shift costs nothing beyond the one cat
        sample_history=window[depth + 1:depth + 1 + sample_depth])
    return prev_sample.to(sample.dtype), new_state
