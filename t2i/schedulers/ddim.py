"""Deterministic DDIM (Song et al. 2021, eq. 12 with eta = 0), on PNDM's machinery.

x_{t'} = sqrt(ab_t') x0_pred + sqrt(1 - ab_t') eps with x0_pred = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
is exactly PNDM's transfer phi (Liu et al. 2022, eq. 11) applied to the eps of the current call,
so DDIM is a PNDM plan whose every call uses its own eps. No clipping or thresholding.
"""

from __future__ import annotations

import torch

from t2i.schedulers.pndm import PNDMState, add_noise, build_state, check, inference_grid, scale_model_input, step
from t2i.schedulers.schedule import NoiseSchedule

__all__ = ["init", "step", "scale_model_input", "add_noise", "check", "PNDMState"]


def init(schedule: NoiseSchedule, num_inference_steps: int = 50, *, set_alpha_to_one: bool = True,
         steps_offset: int = 0, timestep_spacing: str = "leading", prediction_type: str | None = None,
         strength: float = 1.0, shape: tuple[int, ...] | torch.Size, device: torch.device | str | None = None,
         dtype: torch.dtype = torch.float32) -> PNDMState:
    """Plan a DDIM run (one model call per timestep, each stepping to the next scheduled one)."""
    grid = inference_grid(schedule, num_inference_steps, timestep_spacing, steps_offset, strength)
    calls = [dict(t=t, x_from=i, eps=[(i, 1.0)]) for i, t in enumerate(grid)]
    return build_state(schedule, calls, set_alpha_to_one=set_alpha_to_one, prediction_type=prediction_type,
                       shape=shape, device=device, dtype=dtype)
