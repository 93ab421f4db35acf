"""`t2i-train --stage vae --init-from VAE_FILE` (t2i/train/init_vae.py): stage 1 fine-tunes an
existing VAE, a t2i vae.safetensors or a diffusers AutoencoderKL folder, as sd-vae-ft-mse
fine-tuned the SD VAE. The run adopts the file's architecture (its own training settings
kept), starts its weights and EMA exactly at the file's, keeps the file's latent scale and
records the file; a conflicting --set, a changed file and a VAE file for stage 2 are one
`Error:` line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i.cli.train import main as train_cli
from t2i.config import VAEConfig, to_dict, to_json
from t2i.models.io import (WeightsError, file_sha256, load_weights, read_metadata,
                           require_config, save_weights)
from t2i.models.vae_files import open_vae, vae_sha256
from t2i.models.vae_import import SD_SCALING_FACTOR, import_vae
from t2i.train.init_from import initialize_from_parent, with_parent
from t2i.train.stages import build_vae
from t2i.train.state import init_train_state
from helpers import error_line, invoke, micro_cfg, run_stage

# the run's own (not the file's) VAE fields: what a fine-tune keeps of its config
RUN_OWN = ("channels_last", *VAEConfig.TRAINING_ONLY)
# training settings that differ from the file's: they must survive the adoption
GAN_OFF_AT_FIRST = ("vae.disc_weight=0.25", "vae.disc_start=50", "vae.disc_channels=8",
                    "vae.disc_layers=1")


def architecture(cfg: VAEConfig) -> dict:
    return {k: v for k, v in to_dict(cfg).items() if k not in RUN_OWN}


@pytest.fixture(scope="module")
def t2i_vae(tmp_path_factory) -> Path:
    """vae.safetensors of a micro stage-1 run whose VAE is wider than MICRO's (12 channels,
    not 8), with a measured latent scale."""
    out = tmp_path_factory.mktemp("stage1") / "run"
    cfg = micro_cfg("train.stage=vae", "vae.base_channels=12", "train.vae_steps=2")
    assert run_stage(cfg, out) == 0
    return out / "vae.safetensors"


@pytest.fixture(scope="module")
def micro_config(tmp_path_factory) -> Path:
    """The MICRO config as a --config file: its keys are not explicit --set overrides."""
    path = tmp_path_factory.mktemp("config") / "micro.json"
    path.write_text(to_json(micro_cfg()))
    return path


def fresh_state(cfg):
    return init_train_state(build_vae(cfg, torch.device("cpu")), 1e-3, 0.0, cfg.train.seed,
                            "fp32", torch.device("cpu"))


def train_args(config: Path, parent: Path, out: Path, *extra) -> list:
    return ["--config", config, "--stage", "vae", "--init-from", parent, "--vae-steps", 2,
            "--out", out, "--device", "cpu", "--log-every", 1, *extra]


def test_a_t2i_vae_file_starts_weights_and_ema_and_brings_its_architecture(
        t2i_vae, micro_config, tmp_path):
    file_cfg = require_config(t2i_vae, read_metadata(t2i_vae)).vae
    mine = micro_cfg("train.stage=vae", *GAN_OFF_AT_FIRST)
    assert mine.vae.base_channels == 8 != file_cfg.base_channels  # the preset differs
    cfg = with_parent(mine, str(t2i_vae))
    assert architecture(cfg.vae) == architecture(file_cfg)
    assert (cfg.vae.disc_weight, cfg.vae.disc_start) == (0.25, 50)  # the user's, not the file's
    state = initialize_from_parent(fresh_state(cfg), cfg, "vae")
    weights = load_file(str(t2i_vae))
    assert state.model.state_dict().keys() == weights.keys()
    assert all(torch.equal(t, weights[k]) for k, t in state.model.state_dict().items())
    assert state.ema.keys() and all(torch.equal(t, weights[k]) for k, t in state.ema.items())
    assert state.step == 0 and len(state.optimizer.state) == 0

    child = tmp_path / "child"
    sets = [a for s in GAN_OFF_AT_FIRST for a in ("--set", s)]
    result = invoke(train_cli, *train_args(micro_config, t2i_vae, child, *sets))
    assert result.exit_code == 0, result.output
    config = json.loads((child / "config.json").read_text())
    assert config["vae"] == {**to_dict(file_cfg), "disc_weight": 0.25, "disc_start": 50,
                             "disc_channels": 8, "disc_layers": 1}
    assert config["init_from"] == {
        "stage": "vae", "path": str(t2i_vae), "checkpoint": str(t2i_vae.resolve()), "step": 2,
        "sha256": file_sha256(t2i_vae), "ema_sha256": "", "kind": "vae_file"}
    scale = read_metadata(t2i_vae)["latent_scale"]
    assert float(scale) != 1.0  # measured by the stage-1 run
    assert read_metadata(child / "vae.safetensors")["latent_scale"] == scale  # kept, not measured
    assert torch.equal(open_vae(child).latent_scale, weights["latent_scale"])


def test_a_diffusers_folder_fine_tunes_with_the_gan_on(micro_config, tmp_path):
    from test_vae_import import SMALL, assert_same_function, random_autoencoder
    model = random_autoencoder(seed=2, **SMALL)
    folder = tmp_path / "sd-vae"
    model.save_pretrained(folder)
    converted = import_vae(folder).state_dict()
    cfg = with_parent(micro_cfg("train.stage=vae"), str(folder))
    state = initialize_from_parent(fresh_state(cfg), cfg, "vae")
    assert all(torch.equal(t, converted[k]) for k, t in state.model.state_dict().items())
    assert all(torch.equal(t, converted[k]) for k, t in state.ema.items())

    child = tmp_path / "child"
    gan = ["--set", "vae.disc_weight=0.5", "--set", "vae.disc_start=0", "--set",
           "vae.disc_channels=8", "--set", "vae.disc_layers=1", "--vae-lr", 1e-12]
    result = invoke(train_cli, *train_args(micro_config, folder, child, *gan))
    assert result.exit_code == 0, result.output
    records = [json.loads(x) for x in (child / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("gan_d" in json.dumps(r) for r in records)  # the discriminator trained
    config = json.loads((child / "config.json").read_text())
    assert config["vae"]["base_channels"] == 32 and config["vae"]["norm_groups"] == 8
    assert config["vae"]["post_quant_conv"] and config["vae"]["attention_bias"]
    assert config["vae"]["downsample_padding"] == "asymmetric"
    assert config["vae"]["disc_weight"] == 0.5
    assert config["init_from"]["sha256"] == vae_sha256(folder)
    tuned = open_vae(child)  # lr 1e-12: two steps leave diffusers' function
    assert tuned.latent_scale.item() == pytest.approx(SD_SCALING_FACTOR, abs=1e-7)
    assert read_metadata(child / "vae.safetensors")["latent_scale"] == "0.18215"  # as imported
    assert_same_function(tuned, model)


def test_an_explicit_architecture_key_that_disagrees_is_one_error_line(
        t2i_vae, micro_config, tmp_path):
    child = tmp_path / "child"
    result = invoke(train_cli, *train_args(micro_config, t2i_vae, child, "--set",
                                           "vae.base_channels=16"))
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "vae.base_channels=16" in line and "vae.base_channels is 12" in line
    assert str(t2i_vae) in line and not child.exists()
    agreeing = micro_cfg("train.stage=vae", "vae.base_channels=12")
    cfg = with_parent(agreeing, str(t2i_vae), ["vae.base_channels=12", "vae.disc_weight=0.1"])
    assert cfg.vae.base_channels == 12  # the same value, explicitly: accepted


def test_a_changed_file_refuses_a_resume_before_the_first_checkpoint(
        t2i_vae, micro_config, tmp_path):
    parent = Path(shutil.copy(t2i_vae, tmp_path / "parent.safetensors"))
    child = tmp_path / "child"
    assert invoke(train_cli, *train_args(micro_config, parent, child)).exit_code == 0
    first = load_file(str(child / "vae.safetensors"))
    shutil.rmtree(child / "vae")  # as if stopped before its first checkpoint
    (child / "vae.safetensors").unlink()
    original = parent.read_bytes()
    tensors, metadata = load_weights(parent)
    tensors["encoder.conv_in.bias"] = tensors["encoder.conv_in.bias"] + 1.0
    save_weights(parent, tensors, metadata)
    resume = ["--resume", child, "--device", "cpu"]
    result = invoke(train_cli, *resume)
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "changed since this run recorded it" in line and str(parent.resolve()) in line
    parent.write_bytes(original)  # restored: the resume starts from the same weights again
    again = invoke(train_cli, *resume)
    assert again.exit_code == 0, again.output
    again_weights = load_file(str(child / "vae.safetensors"))
    assert all(torch.equal(first[k], again_weights[k]) for k in first)


def test_a_vae_file_is_no_unet_parent(t2i_vae, micro_config, tmp_path):
    result = invoke(train_cli, "--config", micro_config, "--stage", "unet", "--init-from",
                    t2i_vae, "--out", tmp_path / "child", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert str(t2i_vae) in line and "pass it with --vae" in line
    cfg = dataclasses.replace(micro_cfg(), train=dataclasses.replace(
        micro_cfg().train, stage="unet"))
    with pytest.raises(WeightsError, match="a VAE is no UNet parent"):
        with_parent(cfg, str(t2i_vae))


def test_freeze_encoder_fine_tunes_the_decoder_alone(t2i_vae, micro_config, tmp_path):
    parent = load_file(str(t2i_vae))
    encoder = [k for k in parent if k.startswith("encoder.")]
    decoder = [k for k in parent if k.startswith("decoder.")]
    assert encoder and decoder and len(encoder) + len(decoder) + 1 == len(parent)  # + scale
    runs = {}
    for frozen in (True, False):  # the unfrozen run is the control: its encoder moves
        out = tmp_path / f"frozen-{frozen}"
        args = train_args(micro_config, t2i_vae, out, "--vae-lr", 1e-2, "--set",
                          f"vae.freeze_encoder={str(frozen).lower()}")
        result = invoke(train_cli, *args)
        assert result.exit_code == 0, result.output
        runs[frozen] = load_file(str(out / "vae.safetensors"))
    tuned = runs[True]
    assert all(torch.equal(tuned[k], parent[k]) for k in encoder)  # the latents stay the file's
    assert all(not torch.equal(tuned[k], parent[k]) for k in decoder)
    assert torch.equal(tuned["latent_scale"], parent["latent_scale"])
    assert not all(torch.equal(runs[False][k], parent[k]) for k in encoder)


def test_freeze_encoder_without_a_vae_file_is_one_error_line(t2i_vae, micro_config, tmp_path):
    start = ["--config", micro_config, "--stage", "vae", "--vae-steps", 2, "--device", "cpu",
             "--set", "vae.freeze_encoder=true"]
    from_scratch = invoke(train_cli, *start, "--out", tmp_path / "scratch")
    assert from_scratch.exit_code == 2, from_scratch.output
    assert "vae.freeze_encoder=true" in error_line(from_scratch.output)
    assert "--init-from" in error_line(from_scratch.output) and not (tmp_path / "scratch").exists()
    run = t2i_vae.parent  # a stage-1 run folder is a checkpoint parent, not a VAE file
    from_checkpoint = invoke(train_cli, *start, "--init-from", run, "--out", tmp_path / "ckpt",
                             "--set", "vae.base_channels=12")  # the parent's architecture
    assert from_checkpoint.exit_code == 2, from_checkpoint.output
    line = error_line(from_checkpoint.output)
    assert "vae.freeze_encoder=true" in line
    assert f"--init-from {run} is a checkpoint, not a VAE file" in line


def test_a_bad_training_setting_is_not_blamed_on_the_vae_file(t2i_vae, micro_config, tmp_path):
    """Checks no VAE architecture can change name the key alone, with --init-from FILE (stage
    1) and --vae FILE (stage 2) alike; an architecture conflict still names the file."""
    from test_vae_import import SMALL, random_autoencoder
    folder = tmp_path / "sd-vae"
    random_autoencoder(seed=2, **SMALL).save_pretrained(folder)
    bad = ["--set", "train.vae_betas=0.5"]
    for args in (train_args(micro_config, t2i_vae, tmp_path / "a", *bad),
                 ["--config", micro_config, "--stage", "unet", "--vae", folder,
                  "--out", tmp_path / "b", *bad]):
        result = invoke(train_cli, *args)
        assert result.exit_code == 2, result.output
        line = error_line(result.output)
        assert line.startswith("Error: train.vae_betas must be two numbers"), line
    wiring = invoke(train_cli, "--config", micro_config, "--stage", "unet", "--vae", folder,
                    "--set", "data.resolution=18", "--out", tmp_path / "c")
    assert wiring.exit_code == 2, wiring.output
    assert f"--vae {folder} brings its VAE architecture" in error_line(wiring.output)


def test_a_fine_tuned_vae_file_brings_its_architecture_to_stage_2(t2i_vae, micro_config,
                                                                   tmp_path):
    """The decoder-only fine-tune is a drop-in replacement: `--vae` with it adopts its
    architecture (12 base channels) under a config of another (MICRO's 8), as the file it was
    fine-tuned from would if imported; a VAE trained by a run of its own must match instead."""
    tuned = tmp_path / "tuned"
    result = invoke(train_cli, *train_args(micro_config, t2i_vae, tuned, "--set",
                                           "vae.freeze_encoder=true"))
    assert result.exit_code == 0, result.output
    stage2 = ["--config", micro_config, "--stage", "unet", "--steps", 2, "--device", "cpu"]
    result = invoke(train_cli, *stage2, "--vae", tuned / "vae.safetensors",
                    "--out", tmp_path / "unet")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["vae"]["base_channels"] == 12
    own = invoke(train_cli, *stage2, "--vae", t2i_vae, "--out", tmp_path / "own")
    assert own.exit_code == 2
    assert f"--vae {t2i_vae} has another VAE architecture than this run's config: " \
           f"vae.base_channels 12 (here 8)" in error_line(own.output)


def test_a_resume_cannot_change_what_the_stage_trains(t2i_vae, micro_config, tmp_path):
    """vae.freeze_encoder changed at --resume once stage 1 has a checkpoint: one Error line
    (its optimizer holds the decoder's state alone), not the optimizer's mismatch."""
    child = tmp_path / "child"
    first = invoke(train_cli, *train_args(micro_config, t2i_vae, child, "--set",
                                          "vae.freeze_encoder=true"))
    assert first.exit_code == 0, first.output
    before = (child / "config.json").read_text()
    result = invoke(train_cli, "--resume", child, "--vae-steps", 4, "--set",
                    "vae.freeze_encoder=false", "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "vae.freeze_encoder=false with --resume" in line and "start a new run" in line
    assert (child / "config.json").read_text() == before  # nothing changed
    same = invoke(train_cli, "--resume", child, "--vae-steps", 4, "--device", "cpu")
    assert same.exit_code == 0, same.output
