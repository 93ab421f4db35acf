"""LMS against an independent float64 derivation written here: sigmas and timesteps from the
option semantics, multistep coefficients by numerical quadrature (scipy), and a list-based run."""

import math

import pytest
import torch

from t2i.schedulers import NoiseSchedule, lms
from helpers import fresh_x, same, snapshot

T = 1000
SCHEDULE = NoiseSchedule.create(T, 0.00085, 0.012, "scaled_linear")
TRAIN_SIGMAS = [math.sqrt((1 - a) / a) for a in SCHEDULE.alphas_cumprod.tolist()]


# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------


def timesteps(n, spacing, offset=0):
    if spacing == "linspace":  # fractional, not rounded
        return [k * (T - 1) / (n - 1) for k in reversed(range(n))]
    if spacing == "leading":
        return [float(k * (T // n) + offset) for k in reversed(range(n))]
    return [float(round(T - k * T / n) - 1) for k in range(n)]  # trailing


def sigma_at(t):
    """Linear interpolation in sigma between training timesteps."""
    low = min(int(math.floor(t)), T - 2)
    w = t - low
    return (1 - w) * TRAIN_SIGMAS[low] + w * TRAIN_SIGMAS[low + 1]


def karras(sigma_max, sigma_min, n, rho=7.0):
    return [(sigma_max ** (1 / rho) + i / (n - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
            for i in range(n)]


def timestep_of(sigma):
    """Invert log sigma, piecewise linear between training timesteps."""
    logs = [math.log(s) for s in TRAIN_SIGMAS]
    target = math.log(sigma)
    for k in range(T - 1):
        if logs[k] <= target <= logs[k + 1]:
            return k + (target - logs[k]) / (logs[k + 1] - logs[k])
    return 0.0 if target < logs[0] else float(T - 1)


def reference_schedule(n, spacing="linspace", offset=0, use_karras=False):
    ts = timesteps(n, spacing, offset)
    sigmas = [sigma_at(t) for t in ts]
    if use_karras:
        sigmas = karras(sigmas[0], sigmas[-1], n)
        ts = [timestep_of(s) for s in sigmas]
    return ts, sigmas + [0.0]


def quad_coefficient(sigmas, i, j, p):
    """int_{sigma_i}^{sigma_{i+1}} of the Lagrange basis polynomial of node sigma_{i-j} among
    sigma_i, ..., sigma_{i-p+1}, by adaptive quadrature."""

    def basis(s):
        out = 1.0
        for k in range(p):
            if k != j:
                out *= (s - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return out

    integrate = pytest.importorskip("scipy.integrate")  # a dev extra
    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsabs=1e-14, epsrel=1e-13)[0]


def reference_run(model, x, sigmas, order, ts):
    """k-diffusion-style LMS over sigmas with Python lists; d = (x - x0_pred) / sigma = eps."""
    ds = []
    for i in range(len(sigmas) - 1):
        ds = ([model(x / math.sqrt(sigmas[i] ** 2 + 1), ts[i], sigmas[i])] + ds)[:order]
        p = min(i + 1, order)
        x = x + sum(quad_coefficient(sigmas, i, j, p) * ds[j] for j in range(p))
    return x


def toy_model(x_in, t, sigma):
    t = float(torch.as_tensor(t, dtype=torch.float32))  # the model sees float32 timesteps
    return 0.5 * torch.tanh(x_in) + 0.2 * math.sin(t / 97.0)


def run(state, x, model=toy_model, sigmas=None):
    sigmas = sigmas if sigmas is not None else state.sigmas.tolist()
    for i, t in enumerate(state.timesteps):
        x, state = lms.step(state, model(lms.scale_model_input(state, x), t, sigmas[i]), x)
    return x, state


# ----------------------------------------------------------------------------------------------
# Timesteps, sigmas, coefficients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("use_karras", [False, True])
def test_timesteps_and_sigmas(n, spacing, use_karras):
    state = lms.init(SCHEDULE, n, timestep_spacing=spacing, steps_offset=1, use_karras_sigmas=use_karras,
                     shape=(1,))
    ts, sigmas = reference_schedule(n, spacing, 1 if spacing == "leading" else 0, use_karras)
    assert state.sigmas.dtype == torch.float64 and state.sigmas[-1].item() == 0.0
    assert state.sigmas.tolist() == pytest.approx(sigmas, rel=1e-12)
    assert state.timesteps.tolist() == pytest.approx(ts, rel=1e-6, abs=1e-4)  # stored as float32
    expected_init = sigmas[0] if spacing != "leading" else math.sqrt(sigmas[0] ** 2 + 1)
    assert state.init_noise_sigma == pytest.approx(expected_init, rel=1e-12)


def test_sigmas_match_diffusers_golden():
    # Hand-copied from diffusers 0.42 LMSDiscreteScheduler(scaled_linear).set_timesteps(10); it
    # builds alpha_bar in float32, hence the 2e-6 tolerance.
    plain = lms.init(SCHEDULE, 10, shape=(1,))
    assert plain.sigmas.tolist()[:4] == pytest.approx([14.614647, 7.8398848, 4.6091762, 2.9183084], rel=1e-6)
    assert plain.timesteps.tolist()[:3] == [999.0, 888.0, 777.0]
    k = lms.init(SCHEDULE, 10, use_karras_sigmas=True, shape=(1,))
    assert k.sigmas.tolist()[:3] == pytest.approx([14.614647, 9.1029377, 5.4784012], rel=2e-6)
    assert k.timesteps.tolist()[1:3] == pytest.approx([916.28406, 815.04498], rel=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("use_karras", [False, True])
def test_coefficients_match_quadrature(order, use_karras):
    n = 12
    state = lms.init(SCHEDULE, n, order=order, use_karras_sigmas=use_karras, shape=(1,), dtype=torch.float64)
    _, sigmas = reference_schedule(n, use_karras=use_karras)
    weights = state.coefficients[:, lms.W0:lms.W0 + order].tolist()
    for i in range(n):
        p = min(i + 1, order)
        expected = [quad_coefficient(sigmas, i, j, p) for j in range(p)] + [0.0] * (order - p)
        assert weights[i] == pytest.approx(expected, rel=1e-10, abs=1e-12), f"step {i}"


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def test_two_steps_on_fixed_inputs():
    state = lms.init(SCHEDULE, 10, shape=(2,), dtype=torch.float64)
    _, (s0, s1, s2, *_) = reference_schedule(10)
    x = torch.tensor([3.0, -1.0], dtype=torch.float64)
    assert lms.scale_model_input(state, x).tolist() == pytest.approx([3.0 / math.sqrt(s0**2 + 1),
                                                                      -1.0 / math.sqrt(s0**2 + 1)], rel=1e-14)
    d0 = torch.tensor([0.5, 0.25], dtype=torch.float64)
    x1, state = lms.step(state, d0, x)
    assert x1.tolist() == pytest.approx((x + (s1 - s0) * d0).tolist(), rel=1e-14)  # order 1: Euler
    d1 = torch.tensor([-0.5, 1.0], dtype=torch.float64)
    x2, _ = lms.step(state, d1, x1)
    # order 2 by hand: the line through (s1, d1), (s0, d0) integrated from s1 to s2
    c_new = (s2 - s1) * ((s2 + s1) / 2 - s0) / (s1 - s0)
    c_old = (s2 - s1) * ((s2 + s1) / 2 - s1) / (s0 - s1)
    assert x2.tolist() == pytest.approx((x1 + c_new * d1 + c_old * d0).tolist(), rel=1e-12)


@pytest.mark.parametrize("order", [2, 4])
@pytest.mark.parametrize("use_karras", [False, True])
def test_full_run_matches_reference(order, use_karras):
    n = 10
    state = lms.init(SCHEDULE, n, order=order, use_karras_sigmas=use_karras, shape=(2, 3), dtype=torch.float64)
    ts, sigmas = reference_schedule(n, use_karras=use_karras)
    x = fresh_x() * state.init_noise_sigma
    ours, _ = run(state, x)
    torch.testing.assert_close(ours, reference_run(toy_model, x, sigmas, order, ts), rtol=1e-10, atol=1e-10)


def test_v_prediction_matches_epsilon():
    """A v-model that is exactly the eps-model in disguise must give the eps-model's samples."""

    def v_model(x_in, t, sigma):
        a, b = 1 / math.sqrt(sigma**2 + 1), sigma / math.sqrt(sigma**2 + 1)  # sqrt(alpha_bar), sqrt(1 - alpha_bar)
        return (toy_model(x_in, t, sigma) - b * x_in) / a

    x = fresh_x() * 14.6
    eps_run, _ = run(lms.init(SCHEDULE, 10, shape=(2, 3), dtype=torch.float64), x)
    v_state = lms.init(SCHEDULE, 10, prediction_type="v_prediction", shape=(2, 3), dtype=torch.float64)
    v_run, _ = run(v_state, x, v_model)
    torch.testing.assert_close(v_run, eps_run, rtol=1e-11, atol=1e-11)


def gaussian_eps(mu, s):
    """Ideal eps for x0 ~ N(mu, s^2) given the model input x_in = (x0 + sigma eps) / sqrt(sigma^2 + 1)."""

    def model(x_in, t, sigma):
        x = x_in * math.sqrt(sigma**2 + 1)
        return sigma * (x - mu) / (s * s + sigma * sigma)

    return model


@pytest.mark.parametrize("use_karras", [False, True])
def test_gaussian_data_lands_on_its_moments(use_karras):
    """The sampler is affine in x_T for Gaussian data, so two starting points give the exact
    output mean and std; sigma ends at 0, so the output is the data distribution itself."""
    mu, s = 0.7, 0.4
    _, sigmas = reference_schedule(50, use_karras=use_karras)
    state = lms.init(SCHEDULE, 50, use_karras_sigmas=use_karras, shape=(2,), dtype=torch.float64)
    spread = math.sqrt(s * s + sigmas[0] ** 2)
    out, _ = run(state, torch.tensor([mu, mu + spread], dtype=torch.float64), gaussian_eps(mu, s), sigmas)
    assert out[0].item() == pytest.approx(mu, abs=1e-12)
    assert (out[1] - out[0]).item() == pytest.approx(s, abs=5e-3)


def test_img2img_start_warms_up_on_the_derivatives_it_has():
    n, strength = 50, 0.5
    state = lms.init(SCHEDULE, n, strength=strength, shape=(2, 3), dtype=torch.float64)
    ts, sigmas = reference_schedule(n)
    first = n - int(n * strength)
    assert state.timesteps.tolist() == pytest.approx(ts[first:], rel=1e-6)
    assert state.sigmas.tolist() == pytest.approx(sigmas[first:], rel=1e-12)
    # The first step has one derivative: it is an Euler step, not a 4th-order coefficient.
    weights = state.coefficients[:, lms.W0:lms.W0 + 4].tolist()
    assert weights[0] == pytest.approx([sigmas[first + 1] - sigmas[first], 0, 0, 0], rel=1e-12)
    assert weights[1][2:] == [0.0, 0.0] and weights[3][3] != 0.0
    x0, noise = fresh_x(seed=1), fresh_x(seed=2)
    x = lms.add_noise(state, x0, noise)
    torch.testing.assert_close(x, x0 + sigmas[first] * noise, rtol=1e-14, atol=1e-14)
    out, _ = run(state, x)
    torch.testing.assert_close(out, reference_run(toy_model, x, sigmas[first:], 4, ts[first:]),
                               rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# Purity, dtype, misuse
# ----------------------------------------------------------------------------------------------


def test_step_is_pure_and_deterministic():
    state = lms.init(SCHEDULE, 10, shape=(2, 3))
    x = fresh_x().float() * state.init_noise_sigma
    for _ in range(5):
        x, state = lms.step(state, torch.tanh(x), x)
    before = snapshot(state)
    out1, state1 = lms.step(state, torch.tanh(x), x)
    out2, state2 = lms.step(state, torch.tanh(x), x)
    assert all(same(before[k], v) for k, v in snapshot(state).items())
    assert torch.equal(out1, out2)
    assert all(same(a, b) for a, b in zip(snapshot(state1).values(), snapshot(state2).values()))


def test_bfloat16_sample_follows_float32():
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        state = lms.init(SCHEDULE, 10, shape=(2, 3), dtype=dtype)
        out[dtype], _ = run(state, (fresh_x() * state.init_noise_sigma).to(dtype))
    assert out[torch.bfloat16].dtype == torch.bfloat16
    torch.testing.assert_close(out[torch.bfloat16].float(), out[torch.float32], rtol=3e-2, atol=3e-2)


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="order"):
        lms.init(SCHEDULE, 10, order=5, shape=(1,))
    with pytest.raises(ValueError, match="prediction_type"):
        lms.init(SCHEDULE, 10, prediction_type="sample", shape=(1,))
    state = lms.init(SCHEDULE, 1, shape=(2, 3))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        lms.step(state, x, torch.zeros(2, 4))
    x, state = lms.step(state, x, x)
    with pytest.raises(IndexError, match="past the end"):
        lms.step(state, x, x)
