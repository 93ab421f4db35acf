"""DDIM (eta = 0) and Euler, which reuse the PNDM and LMS machinery, against their formulas."""

import math

import pytest
import torch

from t2i.schedulers import NoiseSchedule, ddim, euler

SCHEDULE = NoiseSchedule.create()
ALPHA_BAR = SCHEDULE.alphas_cumprod.tolist()


def toy_model(x, t):
    return 0.5 * torch.tanh(x) + 0.2 * math.sin(float(t) / 97.0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_song_et_al_eq_12(prediction_type):
    n = 10
    state = ddim.init(SCHEDULE, n, steps_offset=1, prediction_type=prediction_type, shape=(2, 3), dtype=torch.float64)
    grid = [k * (1000 // n) + 1 for k in reversed(range(n))]
    assert state.timesteps.tolist() == grid
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = x.clone()
    for i, t in enumerate(grid):
        a, a_next = ALPHA_BAR[t], (ALPHA_BAR[grid[i + 1]] if i + 1 < n else 1.0)  # set_alpha_to_one
        out = toy_model(expected, t)
        eps = out if prediction_type == "epsilon" else math.sqrt(a) * out + math.sqrt(1 - a) * expected
        x0_pred = (expected - math.sqrt(1 - a) * eps) / math.sqrt(a)
        expected = math.sqrt(a_next) * x0_pred + math.sqrt(1 - a_next) * eps
    for t in state.timesteps:
        x, state = ddim.step(state, toy_model(x, t), x)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def test_euler_is_first_order_over_sigmas():
    n = 8
    state = euler.init(SCHEDULE, n, shape=(2, 3), dtype=torch.float64)
    sigmas = state.sigmas.tolist()
    train = [math.sqrt((1 - a) / a) for a in ALPHA_BAR]
    assert sigmas[0] == pytest.approx(train[-1], rel=1e-12) and sigmas[-1] == 0.0
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    expected = x.clone()
    for i in range(n):
        d = toy_model(expected / math.sqrt(sigmas[i] ** 2 + 1), 0)
        expected = expected + (sigmas[i + 1] - sigmas[i]) * d
    for t in state.timesteps:
        x, state = euler.step(state, toy_model(euler.scale_model_input(state, x), 0), x)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="order"):
        euler.init(SCHEDULE, n, order=2, shape=(1,))
