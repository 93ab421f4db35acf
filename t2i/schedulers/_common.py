"""Pieces shared by the samplers: inference timestep grids, img2img start, eager checks."""

from __future__ import annotations

import numpy as np
import torch

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def timestep_grid(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                  steps_offset: int = 0, round_linspace: bool = True) -> np.ndarray:
    """(n,) float64 inference timesteps, high noise first.

    leading:  k * (T // n) + steps_offset, k = n-1 .. 0 (Stable Diffusion's default);
    linspace: linspace(0, T - 1, n) reversed, rounded when `round_linspace` (PNDM), float for LMS;
    trailing: round(T - k * T / n) - 1, k = 0 .. n-1 (always starts at T - 1).
    `steps_offset` only shifts `leading`, as in the reference.
    """
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {n}")
    if spacing == "leading":
        grid = np.arange(n, dtype=np.float64)[::-1] * (T // n) + steps_offset
    elif spacing == "linspace":
        grid = np.linspace(0, T - 1, n, dtype=np.float64)[::-1]
        grid = np.round(grid) if round_linspace else grid
    elif spacing == "trailing":
        grid = np.round(np.arange(T, 0, -T / n, dtype=np.float64)) - 1
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {', '.join(TIMESTEP_SPACINGS)}")
    if len(grid) != n:  # float steps in np.arange can add one point
        grid = grid[:n]
    if grid.max() > T - 1 or grid.min() < 0:
        raise ValueError(f"steps_offset={steps_offset} moves the timesteps outside [0, {T - 1}]")
    return grid.copy()


def start_index(num_inference_steps: int, strength: float) -> int:
    """First grid index of an img2img run: the last `int(n * strength)` steps are run, as the
    Stable Diffusion img2img pipelines do. strength 1.0 runs everything."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    run = min(int(num_inference_steps * strength), num_inference_steps)
    if run < 1:
        raise ValueError(f"strength={strength} with {num_inference_steps} steps runs no step at all")
    return num_inference_steps - run


def to_device(array: np.ndarray, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(array)).to(device=device, dtype=dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic happens in at least float32; the result is cast back to the sample's dtype."""
    return torch.promote_types(dtype, torch.float32)


def check_step_inputs(name: str, history: torch.Tensor, step_index: torch.Tensor, num_steps: int,
                      model_output: torch.Tensor, sample: torch.Tensor) -> None:
    """Eager validation of one `step` call: shapes, dtypes and devices against the state, and
    the step counter. On the CPU the counter is read directly; elsewhere a device-side assert
    avoids a host sync (a compiled step skips all of this)."""
    shape = tuple(history.shape[1:])
    for label, tensor in (("model_output", model_output), ("sample", sample)):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}.step: {label} has shape {tuple(tensor.shape)} but the state "
                             f"was initialised for shape {shape}; call {name}.init(..., shape=...) again")
        if tensor.device != history.device:
            raise ValueError(f"{name}.step: {label} is on {tensor.device}, the state on {history.device}")
        if not tensor.is_floating_point():
            raise TypeError(f"{name}.step: {label} must be a floating-point tensor, got {tensor.dtype}")
    if compute_dtype(sample.dtype) != history.dtype:
        raise TypeError(f"{name}.step: a {sample.dtype} sample needs a state made with "
                        f"dtype={sample.dtype}; this one works in {history.dtype}")
    message = (f"{name}.step: stepped past the end of the schedule ({num_steps} steps); "
               f"init a new state to sample again")
    if step_index.device.type == "cpu":
        if int(step_index) >= num_steps:
            raise IndexError(message)
    else:
        torch._assert_async(step_index < num_steps, message)
