"""The model bench cases run end to end on quick settings (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from bench import core
from bench.cases import models  # noqa: F401 - registers the cases


def test_model_cases_run_quick():
    ctx = core.BenchContext(preset="tiny", compile=False, repeats=1, warmup=0, quick=True)
    for case in ("unet", "vae", "text"):
        rows = core.CASES[case](ctx)
        assert rows and all(row["median_s"] > 0 and row["flops_per_sample"] > 0 for row in rows)
    assert torch.is_grad_enabled()


def test_peer_unet_matches_structure():
    pytest.importorskip("diffusers", reason="the peer UNet is optional (pip install diffusers)")
    from t2i.config import get_preset
    from t2i.models.summary import count_params
    from t2i.models.unet import UNet

    cfg = get_preset("tiny").unet
    ours, peer = count_params(UNet(cfg)), count_params(models.peer_unet(cfg, 8))
    assert abs(peer - ours) <= models.PARAM_TOLERANCE * ours  # identical at the time of writing
