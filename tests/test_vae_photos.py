"""The `vae-photos` bench case at its --quick size (a few stage-1 steps on packed skimage
crops, through t2i-train's launch): its rows and fields, the side-by-side PNG, held-out tiles
that no training crop comes from, and the sharpness of the originals against themselves. No
quality assertions: a few steps say nothing about the GAN."""

from __future__ import annotations

import dataclasses
import json
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from bench.__main__ import main as bench_cli
from bench.cases import vae_photos
from t2i.eval import sharpness_ratio

pytest.importorskip("skimage")


def vae_photos_quick():
    """The context `--quick --device cpu` gives the case."""
    from bench.core import BenchContext
    return BenchContext(quick=True, device="cpu")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("vae-photos")
    result = CliRunner().invoke(bench_cli, [
        "vae-photos", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out),
        "--json", str(out / "r.json")])
    assert result.exit_code == 0, result.output
    return json.loads((out / "r.json").read_text()), str(out)


def test_rows_and_fields(quick_report):
    document, _ = quick_report
    rows = {row["name"]: row for row in document["results"]}
    assert "L1+KL" in rows and "L1+KL+GAN" in rows
    l1 = rows["L1+KL"]
    settings = vae_photos.settings_for(vae_photos_quick())
    for row in [l1] + ([rows["L1+KL+GAN"]] if vae_photos.gan_available() else []):
        assert {"psnr_db", "psnr_db_min", "ssim", "sharpness", "rfid", "train_s"} <= set(row)
        assert row["n"] == settings.max_tiles and row["steps"] == settings.steps
        assert row["psnr_db"] > 0 and row["sharpness"] > 0 and row["rfid"] is None
    if vae_photos.gan_available():
        gan = rows["L1+KL+GAN"]
        assert gan["vae.disc_weight"] == settings.disc_weight > 0 and l1["vae.disc_weight"] == 0
        assert gan["train.vae_betas"] == l1["train.vae_betas"] == [0.5, 0.9]  # small's, LDM's
        goal = rows["goal"]
        assert goal["sharpness_gain"] == pytest.approx(
            abs(1 - l1["sharpness"]) - abs(1 - gan["sharpness"]))
        assert goal["psnr_drop_db"] == pytest.approx(l1["psnr_db"] - gan["psnr_db"])
    else:
        assert "skipped" in rows["L1+KL+GAN"]


def test_side_by_side_png(quick_report):
    document, out = quick_report
    l1 = next(row for row in document["results"] if row["name"] == "L1+KL")
    assert l1["png"].startswith(out) and l1["png"].endswith(".png")
    runs = l1["png_rows"].count("/")  # "original / L1+KL[ / L1+KL+GAN]"
    settings = vae_photos.settings_for(vae_photos_quick())
    side = 3 * settings.resolution + 2  # 3x zoom, 2-pixel padding
    width, height = Image.open(l1["png"]).size
    assert (width, height) == (settings.shown * side + 2, (runs + 1) * side + 2)


def test_held_out_tiles_and_sharpness_of_the_originals():
    s = vae_photos.Settings()
    assert not set(vae_photos.HELD_OUT) & set(vae_photos.TRAIN_PHOTOS)
    photos = [vae_photos.load_photo(n, s.scale_side) for n in vae_photos.HELD_OUT]
    assert all(min(p.shape[:2]) == s.scale_side and p.shape[2] == 3 for p in photos)
    held_out = vae_photos.tiles(photos, s.resolution)
    count = sum((p.shape[0] // s.resolution) * (p.shape[1] // s.resolution) for p in photos)
    assert held_out.shape == (count, 3, s.resolution, s.resolution)
    assert -1 <= held_out.min() and held_out.max() <= 1
    assert sharpness_ratio(held_out.clone(), held_out) == 1.0


def test_random_crops_are_seeded():
    photos = [np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)]
    a, b = (vae_photos.random_crops(photos, 5, 8, seed=3) for _ in range(2))
    assert all(x.shape == (8, 8, 3) and np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in
                   zip(a, vae_photos.random_crops(photos, 5, 8, seed=4)))


def test_runs_differ_only_in_the_gan_keys(tmp_path):
    s = vae_photos.Settings()
    l1, gan = (vae_photos.run_config(s, tmp_path, g) for g in (False, True))
    assert l1.preset == "small" and l1.vae.base_channels == s.width
    assert l1.train.vae_steps == gan.train.vae_steps and l1.train.seed == gan.train.seed
    if vae_photos.gan_available():
        assert l1.vae.disc_weight == 0 and gan.vae.disc_weight == s.disc_weight
        # vae.disc_weight is the only difference
        assert dataclasses.replace(gan.vae, disc_weight=0.0) == l1.vae
        assert l1.train == gan.train and l1.data == gan.data


def test_a_failed_run_names_its_log_and_stops_the_other(tmp_path, monkeypatch):
    """Two runs at once: one with a bad config value (t2i-train exits 2 at once), one that
    would train 10,000 steps on the built-in shapes: the error names the first one's log and
    the second process is ended, not left running."""
    started = []
    popen = subprocess.Popen

    def record(*args, **kwargs):
        started.append(popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(vae_photos.subprocess, "Popen", record)
    s = vae_photos.Settings(steps=10_000, width=8)
    long = [o for o in vae_photos.run_overrides(s, tmp_path, gan=False)
            if not o.startswith("data.source=")] + ["data.source=shapes"]
    jobs = [(["train.vae_steps=0"], tmp_path / "bad"), (long, tmp_path / "long")]
    with pytest.raises(RuntimeError, match="status 2; see .*bad.log"):
        vae_photos.train_all(jobs, torch.device("cpu"), parallel=True)
    assert "train.vae_steps" in (tmp_path / "bad.log").read_text()
    assert len(started) == 2 and all(proc.poll() is not None for proc in started)
    assert started[1].returncode != 0 and not (tmp_path / "long" / "vae.safetensors").exists()


def test_all_leaves_the_training_benchmark_out_but_it_runs_when_named():
    from bench.__main__ import _select

    every = _select(("all",))
    assert "vae-photos" not in every and "latents" in every and "unet" in every
    assert _select(("vae-photos",)) == ["vae-photos"]
