"""Pieces shared by the samplers: inference timestep grids, img2img start, plan checks, the
sync-free table look-up and the float32 region every step and input scaling runs in."""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import numpy as np
import torch

F = TypeVar("F", bound=Callable)

TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def timestep_grid(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                  steps_offset: int = 0, round_linspace: bool = True) -> np.ndarray:
    """(n,) float64 inference timesteps, high noise first.

    leading:  k * (T // n) + steps_offset, k = n-1 .. 0 (Stable Diffusion's default);
    linspace: linspace(0, T - 1, n) reversed, rounded when `round_linspace` (PNDM), float for LMS;
              one step is [T - 1];
    trailing: round(T - k * T / n) - 1, k = 0 .. n-1 (always starts at T - 1).
    `steps_offset` only shifts `leading`, as in the reference. `trailing` is the spacing whose
    first call is at the noisiest timestep for every n in 1..T (Lin et al. 2024, sec. 3.3).
    """
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and num_train_timesteps={T}, got {n}")
    if spacing == "leading":
        grid = np.arange(n, dtype=np.float64)[::-1] * (T // n) + steps_offset
    elif spacing == "linspace":
        # deviation: the reference's single step is at t = 0, i.e. almost no noise removed
        grid = np.linspace(0, T - 1, n, dtype=np.float64)[::-1] if n > 1 else np.array([T - 1.0])
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


def check_plan(name: str, timesteps: np.ndarray, table: np.ndarray, num_train_timesteps: int) -> None:
    """Host-side validation of a whole run, once in `init` (never per step): every model call
    inside [0, T - 1] and every coefficient finite. A bad plan is a ValueError here rather than a
    device-side assert later, which would poison the CUDA context."""
    if len(timesteps) == 0:
        raise ValueError(f"{name}.init: the run has no model call")
    if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
        raise ValueError(f"{name}.init: timesteps {timesteps.min():g}..{timesteps.max():g} leave "
                         f"[0, {num_train_timesteps - 1}]")
    if not np.isfinite(table).all():
        raise ValueError(f"{name}.init: non-finite coefficients (check the schedule's betas)")


def with_past_the_end_row(table: np.ndarray) -> np.ndarray:
    """(N + 1, K): the per-call table plus a NaN row that a step past the end reads. On an
    accelerator the eager step does not read its counter (that would be a host sync), so
    stepping past the end yields NaN samples instead of reading out of bounds."""
    return np.vstack([table, np.full((1, table.shape[1]), np.nan)])


def table_row(table: torch.Tensor, step_index: torch.Tensor) -> torch.Tensor:
    """Row `step_index` of a per-call table without a host sync: `table[step_index]` with a 0-d
    tensor calls `.item()`; index_select with a one-element index stays on the device. Indices
    past the end read the last (NaN) row."""
    index = step_index.clamp(max=table.shape[0] - 1).view(1)  # (1,)
    return table.index_select(0, index)[0]  # (K,)


def float32_region(fn: F) -> F:
    """Run a sampler's `step` / `scale_model_input` with autocast off, whatever the caller has
    on: CUDA autocast runs torch.mv in bf16 (CPU autocast does not), which would mix the eps
    history at 8 bits. The function itself casts its inputs to the state's arithmetic dtype."""

    @functools.wraps(fn)
    def wrapper(state, *args: torch.Tensor, **kwargs: torch.Tensor):
        device_type = next(iter((*args, *kwargs.values()))).device.type  # the tensors' device
        # Under torch.compile the device is one that compiles (CUDA, CPU): skip the check, which
        # dynamo cannot trace on torch 2.11 (`torch._C._is_autocast_available` is skipped there).
        if not torch.compiler.is_compiling() and not torch.amp.is_autocast_available(device_type):
            return fn(state, *args, **kwargs)  # e.g. "meta": no autocast to turn off
        with torch.autocast(device_type, enabled=False):
            return fn(state, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def check_step_inputs(name: str, history: torch.Tensor, step_index: torch.Tensor, num_steps: int,
                      model_output: torch.Tensor, sample: torch.Tensor) -> None:
    """Eager validation of one `step` call: shapes, dtypes and devices against the state (tensor
    metadata, no sync), and on the CPU the step counter (a CPU read is no device sync). On an
    accelerator nothing reads the counter: a step past the end gives NaN (`table_row`). A
    compiled step skips all of this."""
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
    if step_index.device.type == "cpu" and int(step_index) >= num_steps:
        raise IndexError(f"{name}.step: stepped past the end of the schedule ({num_steps} steps); "
                         f"init a new state to sample again")
