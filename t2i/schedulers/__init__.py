"""Noise schedule and samplers, written as pure functions over frozen tensor state.

    from t2i.schedulers import NoiseSchedule, pndm, lms
    state = pndm.init(schedule, 50, shape=x.shape, device=x.device, dtype=x.dtype)
    x, state = pndm.step(state, eps, x)
"""

from t2i.schedulers import ddim, euler, lms, pndm
from t2i.schedulers.schedule import NoiseSchedule

__all__ = ["NoiseSchedule", "ddim", "euler", "lms", "pndm"]
