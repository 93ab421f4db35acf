"""The sharpness figure of the vae suite (t2i.eval.highfreq_energy / sharpness_ratio) against an
independent numpy float64 computation and on a real photo (skimage's astronaut): blur lowers
it monotonically with sigma, an identical copy gives exactly 1, added noise raises it. Then the
suite's report (stand-in feature extractor for rFID) and `t2i-eval --suite vae` on a run with
only stage 1 done."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from t2i import eval as metrics
from t2i.cli.eval import main as eval_cli
from helpers import error_line, invoke


def numpy_highfreq_energy(images: np.ndarray, cutoff: float, window: bool) -> np.ndarray:
    """The docstring's definition written again in numpy float64: (B, 3, H, W) -> (B,)."""
    y = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]  # (B, H, W)
    y = y - y.mean(axis=(1, 2), keepdims=True)
    h, w = y.shape[1:]
    if window:
        y = y * np.outer(np.hanning(h), np.hanning(w))
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    band = np.hypot(fy[:, None], fx[None, :]) > cutoff
    return (np.abs(np.fft.fft2(y)) ** 2 * band).sum(axis=(1, 2))


def photo(side: int = 128) -> np.ndarray:
    """A (1, 3, side, side) float64 crop of skimage's astronaut in [-1, 1] (hair, fabric and
    flag edges: detail in every band)."""
    from skimage import data
    crop = data.astronaut()[64:64 + 2 * side:2, 160:160 + 2 * side:2]  # (side, side, 3) uint8
    return (crop.astype(np.float64) / 127.5 - 1).transpose(2, 0, 1)[None]


@pytest.mark.parametrize("window", [True, False])
@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 3, 17, 24)])
def test_highfreq_energy_matches_numpy(window, shape):
    x = np.random.default_rng(0).uniform(-1, 1, shape)
    ours = metrics.highfreq_energy(torch.from_numpy(x).float(), 0.25, window)
    expected = numpy_highfreq_energy(x.astype(np.float32).astype(np.float64), 0.25, window)
    assert ours.dtype == torch.float64 and ours.shape == (shape[0],)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10)


def test_the_band_is_above_the_cutoff():
    """A grey cosine on the DFT grid (no window): at 20/64 cycles/pixel (> 0.25) all its
    energy is in the band, sum |F|^2 = N^2 sum y^2 (Parseval); at 12/64 (< 0.25) none is."""
    n = 64
    cols = torch.arange(n, dtype=torch.float64)
    for k, inside in ((20, True), (12, False)):
        wave = torch.cos(2 * torch.pi * k / n * cols).expand(1, 3, n, n)  # (1, 3, n, n)
        energy = metrics.highfreq_energy(wave, window=False).item()
        total = n * n * (wave[0, 0] ** 2).sum().item()
        assert energy == pytest.approx(total if inside else 0.0, rel=1e-9, abs=1e-6)


def test_blur_lowers_the_ratio_noise_raises_it_a_copy_is_one():
    x = photo()
    original = torch.from_numpy(x)
    assert metrics.sharpness_ratio(original.clone(), original) == 1.0
    ratios = []
    for sigma in (0.5, 1.0, 2.0):
        blurred = gaussian_filter(x, sigma=(0, 0, sigma, sigma))
        ours = metrics.sharpness_ratio(torch.from_numpy(blurred), original)
        expected = (numpy_highfreq_energy(blurred, 0.25, True).sum()
                    / numpy_highfreq_energy(x, 0.25, True).sum())
        assert ours == pytest.approx(expected, rel=1e-10)
        ratios.append(ours)
    assert 1 > ratios[0] > ratios[1] > ratios[2] > 0, ratios
    noisy = x + np.random.default_rng(1).normal(0, 0.05, x.shape)
    assert metrics.sharpness_ratio(torch.from_numpy(noisy), original) > 1


def test_flat_originals_have_no_ratio():
    flat = torch.zeros(2, 3, 16, 16)
    assert metrics.sharpness_ratio(torch.rand(2, 3, 16, 16), flat) is None


class Identity(torch.nn.Module):
    """A stand-in VAE whose reconstruction is its input (posterior mean = the image)."""

    def encode(self, x):
        return type("Posterior", (), {"mode": lambda _: x})()

    def decode(self, z):
        return z


def test_reconstruction_metrics_of_a_perfect_autoencoder():
    batches = [torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1]
    features = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # noqa: E731  (B, 6)
    out = metrics.reconstruction_metrics(Identity(), batches, torch.device("cpu"), features)
    assert out["n"] == 5 and out["sharpness"] == 1.0 and out["ssim"] == pytest.approx(1.0)
    assert out["rfid"] == pytest.approx(0.0, abs=1e-9) and "rfid_note" not in out
    plain = metrics.reconstruction_metrics(Identity(), batches, torch.device("cpu"))
    assert plain["rfid"] is None and "--inception-weights" in plain["rfid_note"]


def test_vae_suite_reports_sharpness_and_rfid(micro_run):
    """The stage-1 model of a run alone (no diffusion checkpoint needed), shapes images."""
    model = metrics.load_autoencoder(micro_run)
    features = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # noqa: E731
    report = metrics.vae_suite(model, "shapes", n=5, batch_size=2, features=features)
    assert report["n"] == 5 and 0 < report["sharpness"] and report["rfid"] > 0
    assert report["highfreq_cutoff"] == 0.25


def test_eval_cli_on_a_stage_1_run(micro_run_copy, tmp_path):
    shutil.rmtree(micro_run_copy / "unet")  # stage 1 only: vae.safetensors, no UNet checkpoint
    result = invoke(eval_cli, micro_run_copy, "--suite", "vae", "--n", 3, "--batch-size", 2)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"] == str((micro_run_copy / "vae.safetensors").resolve())
    assert report["n"] == 3 and report["sharpness"] > 0 and report["rfid"] is None
    assert "--inception-weights" in report["rfid_note"]
    missing = invoke(eval_cli, micro_run_copy, "--suite", "vae", "--n", 3,
                     "--inception-weights", tmp_path / "nope.pth")
    assert missing.exit_code == 2 and "nope.pth" in error_line(missing.output)
    shapes = invoke(eval_cli, micro_run_copy, "--suite", "shapes")
    assert shapes.exit_code == 2 and "train stage 2 first" in error_line(shapes.output)
