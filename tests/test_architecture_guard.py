"""Stored weights run only under the architecture they were trained with (config/architecture.py).
Tensor names and shapes miss unet.norm_groups, unet.num_heads, unet.flip_sin_to_cos,
vae.norm_groups, ...: before, `--resume RUN --set vae.norm_groups=8` trained on, and the run's
VAE file then encoded 52% off in stage 2 and decoded 97% off in t2i-sample. Every place that
puts stored weights under a config checks it: a resume, --init-from (tests/test_init_from.py),
stage 2's VAE file (load_vae) and sampling (load_pipeline). Also: a stage-1 checkpoint named in
--resume of a run whose stage 1 has finished is refused, not silently skipped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from t2i.cli.train import main as train_cli
from t2i.config import apply_overrides, config_from_json, to_json
from t2i.models.io import WeightsError, load_weights, save_weights
from helpers import error_line, invoke, micro_cfg


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file()}


@pytest.mark.parametrize("change, was", [
    ("unet.norm_groups=8", "unet.norm_groups 4 (now 8)"),
    ("unet.flip_sin_to_cos=false", "unet.flip_sin_to_cos true (now false)"),
    ("vae.norm_groups=8", "vae.norm_groups 4 (now 8)"),
    ("text.heads=4", "text.heads 2 (now 4)"),
])
def test_a_resume_refuses_to_change_the_architecture_of_trained_weights(micro_run_copy, change,
                                                                        was):
    before = snapshot(micro_run_copy)
    result = invoke(train_cli, "--resume", micro_run_copy, "--set", change, "--steps", 6)
    assert result.exit_code == 2, result.output
    assert error_line(result.output) == (
        f"Error: --resume {micro_run_copy}: the run's weights were trained with {was}; a "
        f"resume keeps the architecture: drop those --set, or start a new run")
    assert snapshot(micro_run_copy) == before


def test_a_resume_may_change_what_does_not_change_the_computation(micro_run_copy):
    result = invoke(train_cli, "--resume", micro_run_copy, "--steps", 5, "--set",
                    "unet.gradient_checkpointing=true", "--set", "unet.channels_last=false")
    assert result.exit_code == 0, result.output
    assert (micro_run_copy / "unet" / "ckpt-0000005").is_dir()


def test_stage_2_refuses_a_vae_file_of_another_architecture(micro_run):
    from t2i.train.vae_stage import load_vae

    path = micro_run / "vae.safetensors"
    assert load_vae(micro_cfg(), path, torch.device("cpu")) is not None
    with pytest.raises(WeightsError, match=r"vae.safetensors' holds a VAE trained with "
                                           r"vae.norm_groups 4 \(now 2\) in the config of "
                                           r"this run"):
        load_vae(micro_cfg("vae.norm_groups=2"), path, torch.device("cpu"))


def test_sampling_refuses_a_vae_file_that_is_not_the_checkpoints(micro_run, tmp_path):
    """A run whose vae.safetensors was trained under another vae.norm_groups than its UNet
    checkpoint's config says (what a resume with --set vae.norm_groups used to make)."""
    from t2i.sample import load_pipeline

    run = Path(shutil.copytree(micro_run, tmp_path / "run"))
    weights, metadata = load_weights(run / "vae.safetensors")
    other = apply_overrides(config_from_json(metadata["config"]), ["vae.norm_groups=2"])
    save_weights(run / "vae.safetensors", weights, {**metadata, "config": to_json(other)})
    with pytest.raises(WeightsError, match=r"holds a VAE trained with vae.norm_groups 2 \(now "
                                           r"4\) in the config of .*ckpt-0000004"):
        load_pipeline(run)
    assert load_pipeline(micro_run).vae is not None


def test_a_stage_1_checkpoint_is_not_resumed_once_stage_1_has_finished(micro_run_copy):
    named = micro_run_copy / "vae" / "ckpt-0000002"
    before = snapshot(micro_run_copy)
    result = invoke(train_cli, "--resume", named)
    assert result.exit_code == 2, result.output
    assert error_line(result.output) == (
        f"Error: --resume {named}: {micro_run_copy} finished stage 1 (vae.safetensors, which "
        f"its stage 2 trains on), so a stage-1 checkpoint is not resumed in it; to train that "
        f"VAE further start a new run with --stage vae --init-from {named}")
    assert snapshot(micro_run_copy) == before
    assert json.loads((micro_run_copy / "config.json").read_text())["train"]["stage"] == "all"
