"""PNDM against an independent float64 derivation written here: timestep lists from the option
semantics, and a direct list-based transcription of Liu et al. 2022 (eqs. 11-13)."""

import math

import pytest
import torch

from t2i.schedulers import NoiseSchedule, pndm
from helpers import fresh_x, same, snapshot

T = 1000
SCHEDULE = NoiseSchedule.create(T, 0.00085, 0.012, "scaled_linear")
ALPHA_BAR = SCHEDULE.alphas_cumprod.tolist()


# ----------------------------------------------------------------------------------------------
# Independent reference
# ----------------------------------------------------------------------------------------------


def grid(n, spacing, offset=0):
    """Inference timesteps, high noise first, from the documented option semantics."""
    if spacing == "leading":
        return [k * (T // n) + offset for k in reversed(range(n))]
    if spacing == "linspace":
        return [round(k * (T - 1) / (n - 1)) for k in reversed(range(n))]
    return [round(T - k * T / n) - 1 for k in range(n)]  # trailing


def model_calls(g, prk, n):
    """Timestep of every model call: PLMS redoes the first interval; PRK has 4 stages per step."""
    if not prk:
        return g[:1] + [g[1]] + g[1:] if len(g) > 1 else g
    half = T // n // 2
    calls = []
    for k in range(3):
        calls += [g[k], g[k + 1] + half, g[k + 1] + half, g[k + 1]]
    return calls + g[3:]


def phi(x, eps, t, t_next, final=None):
    """Transfer part, Liu et al. 2022 eq. 11 (t_next None: the final alpha_bar)."""
    a = ALPHA_BAR[t]
    a_next = final if t_next is None else ALPHA_BAR[t_next]
    denominator = math.sqrt(a) * (math.sqrt((1 - a_next) * a) + math.sqrt((1 - a) * a_next))
    return math.sqrt(a_next / a) * x - (a_next - a) / denominator * eps


def plms_combination(ets):
    """Eq. 12 and its lower-order starts, ets oldest first."""
    e = ets[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def reference_run(model, x, g, prk, n, final):
    """A whole PNDM run, written from the paper with Python lists; each transfer lands on the
    next scheduled timestep."""
    ets = []
    if prk:
        half = T // n // 2
        for k in range(3):
            t, t_next = g[k], g[k + 1]
            mid = t_next + half
            e1 = model(x, t)
            e2 = model(phi(x, e1, t, mid), mid)
            e3 = model(phi(x, e2, t, mid), mid)
            e4 = model(phi(x, e3, t, t_next), t_next)
            ets.append(e1)
            x = phi(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, t, t_next)
        rest = g[3:]
    else:
        if len(g) == 1:
            return phi(x, model(x, g[0]), g[0], None, final)
        e0 = model(x, g[0])
        e1 = model(phi(x, e0, g[0], g[1]), g[1])
        ets.append(e0)
        x = phi(x, (e0 + e1) / 2, g[0], g[1])
        rest = g[1:]
    for i, t in enumerate(rest):
        ets = (ets + [model(x, t)])[-4:]
        x = phi(x, plms_combination(ets), t, rest[i + 1] if i + 1 < len(rest) else None, final)
    return x


def toy_model(x, t):
    """A smooth nonlinear stand-in for a network (eps prediction)."""
    t = float(t)
    return 0.5 * torch.tanh(x) + 0.2 * math.sin(t / 97.0)


def run(state, x, model=toy_model):
    for t in state.timesteps:
        x, state = pndm.step(state, model(pndm.scale_model_input(state, x), t), x)
    return x, state


# ----------------------------------------------------------------------------------------------
# Timesteps
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("prk", [False, True])
def test_timesteps(n, spacing, offset, prk):
    state = pndm.init(SCHEDULE, n, skip_prk_steps=not prk, steps_offset=offset,
                      timestep_spacing=spacing, shape=(1,))
    offset = offset if spacing == "leading" else 0  # the offset only moves `leading`
    assert state.timesteps.dtype == torch.int64
    assert state.timesteps.tolist() == model_calls(grid(n, spacing, offset), prk, n)


def test_timesteps_match_diffusers_golden():
    # Hand-copied from diffusers 0.42 PNDMScheduler(scaled_linear).set_timesteps(10).timesteps.
    plms = pndm.init(SCHEDULE, 10, skip_prk_steps=True, steps_offset=1, shape=(1,))
    assert plms.timesteps.tolist() == [901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    prk = pndm.init(SCHEDULE, 10, skip_prk_steps=False, steps_offset=1, shape=(1,))
    assert prk.timesteps.tolist() == [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601,
                                      601, 501, 401, 301, 201, 101, 1]
    prk_linspace = pndm.init(SCHEDULE, 10, skip_prk_steps=False, timestep_spacing="linspace", shape=(1,))
    assert prk_linspace.timesteps.tolist() == [999, 938, 938, 888, 888, 827, 827, 777, 777, 716, 716,
                                               666, 666, 555, 444, 333, 222, 111, 0]


# ----------------------------------------------------------------------------------------------
# Steps
# ----------------------------------------------------------------------------------------------


def test_one_step_on_fixed_inputs():
    state = pndm.init(SCHEDULE, 10, steps_offset=1, shape=(3,), dtype=torch.float64)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    eps = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
    prev, new_state = pndm.step(state, eps, x)
    expected = [phi(xi, ei, 901, 801) for xi, ei in zip(x.tolist(), eps.tolist())]
    assert prev.tolist() == pytest.approx(expected, rel=1e-14)
    # diffusers 0.42 (float32) gives 1.3041598 for x = 1, eps = 0.5 at t = 901 -> 801 (run by hand)
    assert prev[0].item() == pytest.approx(1.3041598, rel=2e-7)
    assert int(new_state.step_index) == 1


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prk", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_full_run_matches_reference(spacing, prk, set_alpha_to_one):
    n = 10
    state = pndm.init(SCHEDULE, n, skip_prk_steps=not prk, steps_offset=1, timestep_spacing=spacing,
                      set_alpha_to_one=set_alpha_to_one, shape=(2, 3), dtype=torch.float64)
    x = fresh_x()
    ours, final_state = run(state, x)
    final = 1.0 if set_alpha_to_one else ALPHA_BAR[0]
    expected = reference_run(toy_model, x, grid(n, spacing, 1 if spacing == "leading" else 0), prk, n, final)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert int(final_state.step_index) == len(state.timesteps)


@pytest.mark.parametrize("prk", [False, True])
def test_v_prediction_is_converted_at_its_own_timestep(prk):
    """A v-model that is exactly the eps-model in disguise must give the eps-model's samples."""

    def v_model(x, t):
        a = ALPHA_BAR[int(t)]
        return (toy_model(x, t) - math.sqrt(1 - a) * x) / math.sqrt(a)

    options = dict(skip_prk_steps=not prk, timestep_spacing="linspace", shape=(2, 3), dtype=torch.float64)
    eps_run, _ = run(pndm.init(SCHEDULE, 10, **options), fresh_x())
    v_run, _ = run(pndm.init(SCHEDULE, 10, prediction_type="v_prediction", **options), fresh_x(), v_model)
    torch.testing.assert_close(v_run, eps_run, rtol=1e-12, atol=1e-12)


def gaussian_eps(mu, s):
    """Ideal eps-predictor for data x0 ~ N(mu, s^2): E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2)."""

    def model(x, t):
        a, b = math.sqrt(ALPHA_BAR[int(t)]), math.sqrt(1 - ALPHA_BAR[int(t)])
        return b * (x - a * mu) / (a * a * s * s + b * b)

    return model


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("prk", [False, True])
def test_gaussian_data_lands_on_its_moments(spacing, prk):
    """With the ideal predictor the sampler is affine in x_T, so running it on the two points
    (m_T, m_T + s_T) of the exact starting marginal gives the exact output mean and std; the
    std error is the method's discretisation error and shrinks with more steps."""
    mu, s = 0.7, 0.4
    errors = []
    for n in (10, 50):
        state = pndm.init(SCHEDULE, n, skip_prk_steps=not prk, timestep_spacing=spacing,
                          set_alpha_to_one=True, shape=(2,), dtype=torch.float64)
        a_T = math.sqrt(ALPHA_BAR[int(state.timesteps[0])])
        m_T, s_T = a_T * mu, math.sqrt(a_T**2 * s**2 + 1 - a_T**2)
        out, _ = run(state, torch.tensor([m_T, m_T + s_T], dtype=torch.float64), gaussian_eps(mu, s))
        assert out[0].item() == pytest.approx(mu, abs=1e-12)
        errors.append(abs((out[1] - out[0]).item() - s))
    assert errors[1] < 0.012 and errors[1] < errors[0] / 3


def test_img2img_start_is_a_fresh_run_on_the_remaining_timesteps():
    n, strength = 10, 0.6
    state = pndm.init(SCHEDULE, n, steps_offset=1, strength=strength, shape=(2, 3), dtype=torch.float64)
    remaining = grid(n, "leading", 1)[n - int(n * strength):]
    assert state.timesteps.tolist() == model_calls(remaining, False, n)
    x0, noise = fresh_x(seed=1), fresh_x(seed=2)
    x = pndm.add_noise(state, x0, noise)
    a = ALPHA_BAR[remaining[0]]
    torch.testing.assert_close(x, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise, rtol=1e-14, atol=1e-14)
    out, _ = run(state, x)
    torch.testing.assert_close(out, reference_run(toy_model, x, remaining, False, n, ALPHA_BAR[0]),
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Purity, dtype, misuse
# ----------------------------------------------------------------------------------------------


def test_step_is_pure_and_deterministic():
    state = pndm.init(SCHEDULE, 10, skip_prk_steps=False, shape=(2, 3))
    x = fresh_x().float()
    for _ in range(6):  # into the Runge-Kutta stages, where most state is in use
        x, state = pndm.step(state, toy_model(x, 500), x)
    before = snapshot(state)
    eps = toy_model(x, 500)
    out1, state1 = pndm.step(state, eps, x)
    out2, state2 = pndm.step(state, eps, x)
    after = snapshot(state)
    assert all(same(before[k], after[k]) for k in before)
    assert torch.equal(out1, out2)
    assert all(same(a, b) for a, b in zip(snapshot(state1).values(), snapshot(state2).values()))
    assert int(state1.step_index) == int(state.step_index) + 1


def test_bfloat16_sample_follows_float32():
    state32 = pndm.init(SCHEDULE, 10, shape=(2, 3), dtype=torch.float32)
    state16 = pndm.init(SCHEDULE, 10, shape=(2, 3), dtype=torch.bfloat16)
    out32, _ = run(state32, fresh_x().float())
    out16, _ = run(state16, fresh_x().bfloat16())
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), out32, rtol=2e-2, atol=2e-2)


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 4 inference steps"):
        pndm.init(SCHEDULE, 3, skip_prk_steps=False, shape=(1,))
    with pytest.raises(ValueError, match="timestep_spacing"):
        pndm.init(SCHEDULE, 10, timestep_spacing="uniform", shape=(1,))
    with pytest.raises(ValueError, match="strength"):
        pndm.init(SCHEDULE, 10, strength=0.05, shape=(1,))
    state = pndm.init(SCHEDULE, 1, shape=(2, 3))
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="shape"):
        pndm.step(state, torch.zeros(3, 2), x)
    with pytest.raises(TypeError, match="dtype"):
        pndm.step(state, x, x.double())
    x, state = pndm.step(state, x, x)
    with pytest.raises(IndexError, match="past the end"):
        pndm.step(state, x, x)
