"""The training noise schedule against an independent float64 derivation (plain Python math)."""

import math

import pytest
import torch

from t2i.config import ScheduleConfig
from t2i.schedulers import NoiseSchedule

T = 1000


def reference_betas(kind, T=T, start=0.00085, end=0.012):
    """Betas written straight from their definitions, one Python float at a time."""
    if kind == "linear":
        return [start + (end - start) * i / (T - 1) for i in range(T)]
    if kind == "scaled_linear":
        return [(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (T - 1)) ** 2 for i in range(T)]

    def f(t):  # Nichol & Dhariwal 2021, eq. 17
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    return [min(1 - f(i + 1) / f(i), 0.999) for i in range(T)]


def reference_alpha_bar(betas):
    out, running = [], 1.0
    for beta in betas:
        running *= 1 - beta
        out.append(running)
    return out


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alpha_bar_match_definitions(kind):
    schedule = NoiseSchedule.create(T, 0.00085, 0.012, kind)
    assert schedule.betas.dtype == torch.float64 and schedule.num_train_timesteps == T
    torch.testing.assert_close(schedule.betas, torch.tensor(reference_betas(kind), dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(schedule.alphas_cumprod,
                               torch.tensor(reference_alpha_bar(reference_betas(kind)), dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)


def test_stable_diffusion_golden_values():
    # Known Stable Diffusion numbers: sigma_max of scaled_linear(0.00085, 0.012) and alpha_bar_0.
    schedule = NoiseSchedule.create()
    assert schedule.alphas_cumprod[0].item() == pytest.approx(1 - 0.00085, rel=1e-12)
    assert schedule.sigmas[-1].item() == pytest.approx(14.6146, abs=1e-4)
    assert schedule.sigmas[0].item() == pytest.approx(0.0291675, abs=1e-6)


def test_trained_betas_and_config():
    betas = [0.01, 0.02, 0.03]
    schedule = NoiseSchedule.create(trained_betas=betas)
    assert schedule.num_train_timesteps == 3
    assert schedule.alphas_cumprod.tolist() == pytest.approx([0.99, 0.99 * 0.98, 0.99 * 0.98 * 0.97], rel=1e-15)
    cfg = ScheduleConfig(num_train_timesteps=500, beta_schedule="linear", prediction_type="v_prediction")
    from_cfg = NoiseSchedule.from_config(cfg)
    assert from_cfg.num_train_timesteps == 500 and from_cfg.prediction_type == "v_prediction"
    torch.testing.assert_close(from_cfg.betas, NoiseSchedule.create(500, cfg.beta_start, cfg.beta_end, "linear").betas)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.create(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.create(prediction_type="sample")
    with pytest.raises(ValueError, match="between 0 and 1"):
        NoiseSchedule.create(trained_betas=[0.1, 1.5])


def test_add_noise_target_and_snr_against_formulas():
    schedule = NoiseSchedule.create()
    alpha_bar = reference_alpha_bar(reference_betas("scaled_linear"))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    xt = schedule.add_noise(x0, noise, t)
    v = schedule.target(x0, noise, t, "v_prediction")
    for i, step in enumerate(t.tolist()):
        a, b = math.sqrt(alpha_bar[step]), math.sqrt(1 - alpha_bar[step])
        torch.testing.assert_close(xt[i], a * x0[i] + b * noise[i], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(v[i], a * noise[i] - b * x0[i], rtol=1e-13, atol=1e-13)
        # v and x_t determine x0 and eps again (the rotation is orthogonal)
        torch.testing.assert_close(a * xt[i] - b * v[i], x0[i], rtol=1e-12, atol=1e-12)
    assert schedule.target(x0, noise, t, "epsilon") is noise
    moved = schedule.to("cpu")
    torch.testing.assert_close(moved.add_noise(x0, noise, t), xt, rtol=0, atol=0)
    snr = schedule.snr(t)
    assert snr.dtype == torch.float32
    expected = [alpha_bar[s] / (1 - alpha_bar[s]) for s in t.tolist()]
    assert snr.tolist() == pytest.approx(expected, rel=1e-6)


def test_dtype_follows_input_and_low_precision_keeps_the_noise():
    # The reference casts alpha_bar to the sample dtype first: in bf16 alpha_bar_0 = 0.99915
    # rounds to 1 and the noise coefficient sqrt(1 - alpha_bar_0) = 0.0292 becomes 0.
    schedule = NoiseSchedule.create()
    for dtype in (torch.bfloat16, torch.float16):
        x0 = torch.zeros(2, 3, dtype=dtype)
        noise = torch.ones(2, 3, dtype=dtype)
        xt = schedule.add_noise(x0, noise, torch.tensor([0, 1]))
        assert xt.dtype == dtype
        expected = [math.sqrt(1 - schedule.alphas_cumprod[i].item()) for i in (0, 1)]
        assert xt[:, 0].float().tolist() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("scale", [0.25, 3.0])
def test_snr_scale_multiplies_snr_at_every_timestep(scale):
    from t2i.config import ScheduleConfig
    base = NoiseSchedule.from_config(ScheduleConfig())
    scaled = NoiseSchedule.from_config(ScheduleConfig(snr_scale=scale))
    t = torch.arange(1000)
    snr = lambda s: s.alphas_cumprod / (1 - s.alphas_cumprod)  # noqa: E731, float64
    torch.testing.assert_close(snr(scaled), scale * snr(base), rtol=1e-9, atol=0)
    assert bool(((scaled.betas > 0) & (scaled.betas < 1)).all())
    assert torch.equal(scaled.snr(t) < base.snr(t), torch.full((1000,), scale < 1))
    assert torch.equal(NoiseSchedule.from_config(ScheduleConfig(snr_scale=1.0)).betas, base.betas)
    with pytest.raises(ValueError, match="snr_scale"):
        NoiseSchedule.from_config(ScheduleConfig(snr_scale=0.0))
