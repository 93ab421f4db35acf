"""Linear multistep (LMS) sampler over sigmas (Karras et al. 2022, k-diffusion's `sample_lms`).

In the variance-exploding view x = x0 + sigma eps the probability-flow ODE is
dx/dsigma = d(x, sigma) = (x - x0_pred) / sigma (Karras et al. 2022, eq. 3 with sigma(t) = t).
LMS of order p integrates the Lagrange polynomial through the last p derivatives:

    x_{i+1} = x_i + sum_j c_{ij} d_{i-j},   c_{ij} = int_{sigma_i}^{sigma_{i+1}} l_j(s) ds,

where l_j is the Lagrange basis polynomial on the nodes sigma_i, ..., sigma_{i-p+1}. The c_{ij}
are integrated exactly (polynomial antiderivative in float64) once in `init`, never by quadrature
at step time. The model sees x / sqrt(sigma^2 + 1), the DDPM-scaled sample.
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

MAX_ORDER = 4
C_MODEL, C_INPUT, C_IN, W0 = 0, 1, 2, 3  # table columns; then the window weights
KARRAS_RHO = 7.0


@dataclass(frozen=True, eq=False)
class LMSState:
    """Sampler state: constant tables from `init` plus the tensors `step` advances."""

    timesteps: torch.Tensor  # (N,) float32: the (possibly fractional) timestep of every model call
    sigmas: torch.Tensor  # (N + 1,) float64, last 0
    coefficients: torch.Tensor  # (N + 1, 3 + H + 2): [c_model, c_input, c_in, weights of d_i, d_{i-1}.., x_i]; NaN last row
    step_index: torch.Tensor  # () int64
    derivatives: torch.Tensor  # (H, *shape) d of the last H = max(order - 1, 1) steps, newest first
    prediction_type: str = "epsilon"
    order: int = 4
    init_noise_sigma: float = 1.0
    start_sigma: float = 0.0  # sigma at timesteps[0], for `add_noise` (img2img start)


def lagrange_integrals(nodes: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """(p,) exact integrals over [lower, upper] of the Lagrange basis polynomials on `nodes`.

    Substituting s = lower + u (upper - lower) keeps the monomial coefficients of order one, so the
    float64 antiderivative is accurate even where the sigmas are large and close together."""
    width = upper - lower
    u_nodes = (np.asarray(nodes, dtype=np.float64) - lower) / width
    out = np.empty(len(u_nodes))
    for j, u_j in enumerate(u_nodes):
        others = np.delete(u_nodes, j)
        basis = np.atleast_1d(np.poly(others)) / np.prod(u_j - others)  # monomial coefficients, highest first
        out[j] = np.polyval(np.polyint(basis), 1.0) * width  # antiderivative is 0 at u = 0
    return out


def lms_weights(sigmas: np.ndarray, order: int) -> np.ndarray:
    """(N, 4) weights: row i integrates from sigmas[i] to sigmas[i+1] through the last
    min(i + 1, order) nodes. Counting stored derivatives (local i) rather than the position in
    the full schedule is the img2img deviation: the reference would start at full order."""
    n = len(sigmas) - 1
    weights = np.zeros((n, MAX_ORDER))
    for i in range(n):
        p = min(i + 1, order)
        weights[i, :p] = lagrange_integrals(sigmas[i - np.arange(p)], sigmas[i], sigmas[i + 1])
    return weights


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = KARRAS_RHO) -> np.ndarray:
    """Karras et al. 2022, eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0.0, 1.0, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_timestep(sigma: np.ndarray, train_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep whose log sigma, linear between training timesteps, equals log sigma."""
    log_train = np.log(train_sigmas)
    return np.interp(np.log(np.maximum(sigma, 1e-10)), log_train, np.arange(len(train_sigmas), dtype=np.float64))


def inference_sigmas(schedule: NoiseSchedule, num_inference_steps: int, timestep_spacing: str,
                     steps_offset: int, use_karras_sigmas: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps (n,), sigmas (n,)) for the whole run, float64. Sigmas are interpolated linearly
    in sigma between training timesteps (as the reference; k-diffusion interpolates log sigma)."""
    train_sigmas = schedule.sigmas.cpu().numpy()
    timesteps = timestep_grid(schedule.num_train_timesteps, num_inference_steps, timestep_spacing,
                              steps_offset, round_linspace=False)
    sigmas = np.interp(timesteps, np.arange(len(train_sigmas), dtype=np.float64), train_sigmas)
    if use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[0], sigmas[-1], num_inference_steps)
        timesteps = sigma_to_timestep(sigmas, train_sigmas)
    return timesteps, sigmas


def init(schedule: NoiseSchedule, num_inference_steps: int = 50, *, order: int = 4,
         use_karras_sigmas: bool = False, steps_offset: int = 0, timestep_spacing: str = "linspace",
         prediction_type: str | None = None, strength: float = 1.0, shape: tuple[int, ...] | torch.Size,
         device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> LMSState:
    """Plan an LMS run of `num_inference_steps` for samples of `shape`.

    `strength` < 1 starts part-way (img2img): only the last int(n * strength) timesteps are run,
    warming the order up again; noise the clean latent with `add_noise(state, x0, noise)`.
    `prediction_type` defaults to the schedule's.
    """
    prediction_type = prediction_type or schedule.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    if not 1 <= order <= MAX_ORDER:
        raise ValueError(f"LMS order must be between 1 and {MAX_ORDER}, got {order}")
    timesteps, sigmas = inference_sigmas(schedule, num_inference_steps, timestep_spacing, steps_offset,
                                         use_karras_sigmas)
    # reference: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
    init_noise_sigma = sigmas[0] if timestep_spacing != "leading" else (sigmas[0] ** 2 + 1) ** 0.5
    first = start_index(num_inference_steps, strength)
    timesteps, sigmas = timesteps[first:], np.append(sigmas[first:], 0.0)
    depth = max(order - 1, 1)  # H
    table = np.zeros((len(timesteps), W0 + depth + 2))
    s = sigmas[:-1]
    # d = (x - x0_pred) / sigma: eps itself, or from v: x0_pred = x / (s^2 + 1) - v s / sqrt(s^2 + 1)
    table[:, C_MODEL], table[:, C_INPUT] = ((1 / np.sqrt(s**2 + 1), s / (s**2 + 1))
                                            if prediction_type == "v_prediction" else (1.0, 0.0))
    table[:, C_IN] = 1 / np.sqrt(s**2 + 1)
    table[:, W0:W0 + order] = lms_weights(sigmas, order)[:, :order]
    table[:, -1] = 1.0  # x_{i+1} = 1 * x_i + sum_j c_ij d_{i-j}
    check_plan("lms", timesteps, table, schedule.num_train_timesteps)
    work = compute_dtype(dtype)  # float64 coefficients, cast once to the arithmetic dtype
    shape = tuple(shape)
    return LMSState(
        timesteps=to_device(timesteps, device, torch.float32),
        sigmas=to_device(sigmas, device, torch.float64),
        coefficients=to_device(with_past_the_end_row(table), device, work),
        step_index=torch.zeros((), device=device, dtype=torch.int64),
        derivatives=torch.zeros((depth, *shape), device=device, dtype=work),
        prediction_type=prediction_type, order=order,
        init_noise_sigma=float(init_noise_sigma), start_sigma=float(sigmas[0]),
    )


@float32_region
def scale_model_input(state: LMSState, sample: torch.Tensor) -> torch.Tensor:
    """x / sqrt(sigma_i^2 + 1): the model was trained on DDPM-scaled samples (sync-free look-up,
    float32 arithmetic with autocast off; the result in the sample's dtype)."""
    c_in = table_row(state.coefficients, state.step_index)[C_IN]
    return (c_in * sample.to(c_in.dtype)).to(sample.dtype)


def add_noise(state: LMSState, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x0 + sigma_0 eps at the first timestep of the run (img2img start)."""
    return x0 + state.start_sigma * noise


def check(state: LMSState, model_output: torch.Tensor, sample: torch.Tensor) -> None:
    """Raise a clear error for a misused `step` (wrong shape, dtype or device; past the end)."""
    check_step_inputs("lms", state.derivatives, state.step_index, state.timesteps.shape[0],
                      model_output, sample)


@float32_region
def step(state: LMSState, model_output: torch.Tensor,
         sample: torch.Tensor) -> tuple[torch.Tensor, LMSState]:
    """One LMS update x_{i+1} = x_i + sum_j c_ij d_{i-j}: (prev_sample, new_state). Pure, free of
    host syncs, and graph-safe under torch.compile(fullgraph=True), where the eager `check` is
    skipped. Runs in the state's dtype (float32 for 16-bit samples) with autocast off."""
    if not torch.compiler.is_compiling():
        check(state, model_output, sample)
    row = table_row(state.coefficients, state.step_index)  # (3 + H + 2,)
    model_output, x = model_output.to(row.dtype), sample.to(row.dtype)  # exact for 16-bit inputs
    d = (model_output if state.prediction_type == "epsilon"
         else row[C_MODEL] * model_output + row[C_INPUT] * x)
    window = torch.cat([d[None], state.derivatives, x[None]])  # (H + 2, *shape)
    prev_sample = torch.mv(window.flatten(1).t(), row[W0:]).view(sample.shape)  # (*shape)
    new_state = dataclasses.replace(state, step_index=state.step_index + 1,
                                    derivatives=window[:state.derivatives.shape[0]])  # a view
    return prev_sample.to(sample.dtype), new_state
