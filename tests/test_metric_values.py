"""Value tests for the small numeric helpers the training loop and the evaluation report rest on:
PSNR, SSIM (against a direct float64 sum over window positions), CLIP's input pixels (against
open_clip's own preprocessing), the learning-rate schedule and the EMA decay warm-up. Each expectation is worked out by hand or by an independent loop."""

from __future__ import annotations

import math

import pytest
import torch

from t2i.eval import clip_pixels, psnr, ssim
from t2i.train.state import ema_decay_at, lr_at


def test_psnr_of_a_constant_error_is_ten_log_of_peak_squared_over_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = torch.full_like(x, 0.1)
    y[1] = 0.2
    # peak-to-peak 2 in [-1, 1]: 10 log10(4 / 0.01) and 10 log10(4 / 0.04)
    assert psnr(x, y).tolist() == pytest.approx([10 * math.log10(400), 10 * math.log10(100)],
                                                rel=1e-6)


@pytest.mark.parametrize("side", [512, 256])
def test_clip_pixels_match_open_clips_preprocessing(side):
    """A textured image shrunk to 224 px as open_clip's eval transform does (PIL bicubic, which
    antialiases): plain bicubic interpolation differs by ~0.6 in normalised units here."""
    from open_clip.transform import image_transform
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8)  # (H, W, 3)
    reference = image_transform(224, is_train=False)(Image.fromarray(pixels.numpy()))  # (3, S, S)
    images = pixels.permute(2, 0, 1)[None].float() / 127.5 - 1  # (1, 3, H, W) in [-1, 1]
    ours = clip_pixels(images, (224, 224))[0]
    assert ours.shape == reference.shape == (3, 224, 224)
    assert (ours - reference).abs().mean() < 0.02


def test_ssim_of_identical_images_is_one_and_of_flat_images_is_the_luminance_term():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    # flat images: no variance, no covariance, so SSIM is (2ab + c1) / (a^2 + b^2 + c1)
    a, b, c1 = 0.5, 0.25, 0.01**2  # -1..1 values 0 and -0.5 map to 0.5 and 0.25
    flat_x, flat_y = torch.zeros(1, 1, 16, 16), torch.full((1, 1, 16, 16), -0.5)
    assert ssim(flat_x, flat_y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1),
                                                        rel=1e-5)


def ssim_direct(x: torch.Tensor, y: torch.Tensor, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004, eq. 13, summed window by window in float64 (one channel)."""
    coords = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-coords**2 / (2 * sigma**2))
    w = torch.outer(g, g) / g.sum() ** 2
    x, y = (x.double() + 1) / 2, (y.double() + 1) / 2
    c1, c2, values = 0.01**2, 0.03**2, []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            px, py = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append(((2 * mx * my + c1) * (2 * cov + c2))
                          / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(torch.stack(values).mean())


def test_ssim_matches_a_direct_window_by_window_sum():
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 14, 15, generator=gen) * 2 - 1
    y = (x + 0.3 * torch.randn(1, 1, 14, 15, generator=gen)).clamp(-1, 1)
    assert ssim(x, y).item() == pytest.approx(ssim_direct(x[0, 0], y[0, 0]), rel=1e-5)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-4),          # warm-up: (step + 1) / warmup of the base rate
    (4, 5e-4),
    (9, 1e-3),          # last warm-up step reaches the base rate
    (10, 1e-3),         # cosine starts at the top
    (60, 5.5e-4),       # half-way through the decay: 0.1 + 0.9 * 0.5
    (110, 1e-4),        # the end: 10% of base
    (500, 1e-4),        # past the end it stays at the floor
])
def test_lr_at_warms_up_linearly_then_decays_by_cosine_to_a_tenth(step, expected):
    assert lr_at(step, 1e-3, warmup=10, total=110, schedule="cosine") == pytest.approx(expected)


def test_lr_at_constant_schedule_holds_after_warm_up():
    assert lr_at(3, 2e-4, warmup=4, total=100, schedule="constant") == pytest.approx(2e-4)
    assert lr_at(99, 2e-4, warmup=4, total=100, schedule="constant") == pytest.approx(2e-4)
    assert lr_at(0, 2e-4, warmup=0, total=100, schedule="cosine") == pytest.approx(2e-4)


@pytest.mark.parametrize("step, decay, expected", [
    (0, 0.9999, 0.1),        # (1 + 0) / (10 + 0)
    (90, 0.9999, 0.91),      # (1 + 90) / (10 + 90)
    (90, 0.9, 0.9),          # capped at the configured decay
    (10**6, 0.9999, 0.9999),
])
def test_ema_decay_warms_up_then_caps(step, decay, expected):
    assert ema_decay_at(step, decay) == pytest.approx(expected)


def test_ema_decay_without_warmup_is_the_configured_decay_from_step_0():
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
    assert ema_decay_at(5, 0.995, warmup=False) == 0.995
