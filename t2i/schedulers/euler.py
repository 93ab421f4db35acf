"""Euler sampler over sigmas (Karras et al. 2022, Algorithm 2 without churn): LMS of order 1.

x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d_i, d_i = (x_i - x0_pred) / sigma_i, which is what
`lms` computes when it integrates a single derivative. Same options as `lms.init` minus `order`.
"""

from __future__ import annotations

from typing import Any

from t2i.schedulers import lms
from t2i.schedulers.lms import LMSState, add_noise, check, scale_model_input, step
from t2i.schedulers.schedule import NoiseSchedule

__all__ = ["init", "step", "scale_model_input", "add_noise", "check", "LMSState"]


def init(schedule: NoiseSchedule, num_inference_steps: int = 50, **options: Any) -> LMSState:
    """`lms.init(..., order=1)`; see there for the options (use_karras_sigmas, spacing, strength...)."""
    if "order" in options:
        raise TypeError("euler.init takes no `order`: Euler is first order")
    return lms.init(schedule, num_inference_steps, order=1, **options)
