"""What a fresh-user trial found: an option the chosen --stage would ignore silently is refused
(--vae with --stage vae trained nothing and said "done"); a VAE file's architecture is adopted
before the config's cross-field checks (its factor decides the legal resolutions, for stage 1's
--init-from and stage 2's --vae); a --config file's init_from is not carried into a new run;
--init-from and t2i-eval name what they take; weight files get the mode open() gives."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from t2i.cli.eval import load_model
from t2i.cli.eval import main as eval_cli
from t2i.cli.train import main as train_cli
from t2i.config import to_json
from t2i.config.sections import InitFromConfig
from t2i.models.io import atomic_write, save_weights
from t2i.models.vae_import import import_vae
from helpers import error_line, invoke, micro_cfg, micro_f8_cfg, save_random_vae


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """--config files of MICRO (f2 VAE: sizes a multiple of 4) and MICRO_F8 (f8 VAE: of 16),
    an untrained MICRO vae.safetensors and a diffusers AutoencoderKL folder (f2, 32 channels:
    not MICRO's architecture)."""
    from test_vae_import import SMALL, random_autoencoder
    root = tmp_path_factory.mktemp("files")
    (root / "micro.json").write_text(to_json(micro_cfg()))
    (root / "f8.json").write_text(to_json(micro_f8_cfg()))
    save_random_vae(micro_cfg(), root / "vae.safetensors")
    random_autoencoder(seed=3, **SMALL).save_pretrained(root / "dvae")
    return {"micro": root / "micro.json", "f8": root / "f8.json",
            "vae": root / "vae.safetensors", "dvae": root / "dvae"}


def train(*args) -> object:
    return invoke(train_cli, *args, "--device", "cpu", "--log-every", 1)


def refused(result, out: Path) -> str:
    """The one Error line of a command that exited 2 and made no run folder."""
    assert result.exit_code == 2, result.output
    assert not out.exists()
    return error_line(result.output)


# ----------------------------------------------------------------------------------------------
# 1. An option the stage would ignore silently
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init_from", [False, True])
def test_vae_with_stage_vae_is_refused_and_names_init_from(files, tmp_path, init_from):
    out = tmp_path / "run"
    parent = ["--init-from", files["dvae"]] if init_from else []
    line = refused(train("--config", files["micro"], "--stage", "vae", "--vae", files["vae"],
                         *parent, "--out", out), out)
    assert line.startswith(f"Error: --vae {files['vae']} names a trained VAE")
    fix = (f"--init-from {files['dvae']} names the VAE it fine-tunes; drop --vae" if init_from
           else f"pass it as --init-from {files['vae']}")
    assert line.endswith(fix)


@pytest.mark.parametrize("args, says", [
    (["--stage", "unet", "--vae-steps", 3], "--vae-steps 3: --stage unet trains no VAE"),
    (["--stage", "unet", "--vae-lr", 0.01], "--vae-lr 0.01: --stage unet trains no VAE"),
    (["--vae", "VAE", "--vae-steps", 3], "replaces stage 1 (no VAE is trained)"),
    (["--stage", "vae", "--steps", 3, "--vae-steps", 4], "--steps and --vae-steps both set"),
    (["--stage", "vae", "--lr", 0.1, "--vae-lr", 0.2], "--lr and --vae-lr both set"),
])
def test_options_the_stage_ignores_are_refused(files, tmp_path, args, says):
    out = tmp_path / "run"
    args = [files["vae"] if a == "VAE" else a for a in args]
    assert says in refused(train("--config", files["micro"], *args, "--out", out), out)


# ----------------------------------------------------------------------------------------------
# 2. A VAE file's factor decides the legal resolutions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_a_vae_files_factor_not_the_presets_decides_the_resolution(files, tmp_path, stage):
    """MICRO_F8's own VAE needs sizes that are multiples of 16; the f2 file's, multiples of 4:
    20 trains, 18 is one line naming the file's factor."""
    vae = files["vae"] if stage == "vae" else files["dvae"]  # stage 2: an imported VAE
    source = ["--init-from", vae, "--vae-steps", 1] if stage == "vae" else ["--vae", vae,
                                                                            "--steps", 1]
    out = tmp_path / "run"
    result = train("--config", files["f8"], "--stage", stage, *source, "--set",
                   "data.resolution=20", "--set", "train.sample_every=0", "--out", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["resolution"] == 20 and config["vae"]["channel_mult"] == [1, 2]
    bad = tmp_path / "bad"
    line = refused(train("--config", files["f8"], "--stage", stage, *source, "--set",
                         "data.resolution=18", "--out", bad), bad)
    assert f"{vae} brings its VAE architecture (downsampling factor 2" in line
    assert "data.resolution 18 must be a multiple of 4 (VAE factor 2" in line


# ----------------------------------------------------------------------------------------------
# 3. init_from is written by the command only
# ----------------------------------------------------------------------------------------------


def test_a_config_files_init_from_is_not_carried_into_a_new_run(files, tmp_path):
    """The --config file of a fine-tune run records its parent, a VAE file that changed since:
    a new run neither starts from it (that would be refused, or silently re-initialize) nor
    records it; only a stage that would have used it gets the notice."""
    parent = InitFromConfig(stage="vae", path="old", checkpoint=str(files["vae"]),
                            sha256="0" * 64, kind="vae_file")  # not the file's sha256
    config = tmp_path / "ft.json"
    config.write_text(to_json(dataclasses.replace(micro_cfg(), init_from=parent)))
    for stage, source, notice in (("vae", ["--vae-steps", 1], True),
                                  ("unet", ["--vae", files["vae"], "--steps", 1], False)):
        out = tmp_path / stage
        result = train("--config", config, "--stage", stage, *source, "--out", out)
        assert result.exit_code == 0, result.output
        assert json.loads((out / "config.json").read_text())["init_from"] == \
            json.loads(to_json(InitFromConfig()))
        assert (f"--init-from {files['vae']} to start from it" in result.output) == notice
    out = tmp_path / "set"
    line = refused(train("--config", files["micro"], "--set", "init_from.stage=vae", "--out",
                         out), out)
    assert "init_from is written by t2i-train itself" in line


def test_the_config_parent_notice_is_one_line_from_rank_0_and_not_when_init_from_is_given(
        files, tmp_path, monkeypatch):
    """The notice about a --config file's parent: absent when this command gives --init-from
    (the run has its parent), and printed by torchrun's rank 0 only (the start-up checks run on
    every rank)."""
    parent = InitFromConfig(stage="vae", path="old", checkpoint=str(files["vae"]),
                            sha256="0" * 64, kind="vae_file")
    config = tmp_path / "ft.json"
    config.write_text(to_json(dataclasses.replace(micro_cfg(), init_from=parent)))
    notice = f"--init-from {files['vae']} to start from it"
    given = train("--config", config, "--stage", "vae", "--vae-steps", 1, "--init-from",
                  files["vae"], "--out", tmp_path / "given")
    assert given.exit_code == 0, given.output
    assert notice not in given.output
    monkeypatch.setenv("RANK", "1")
    other_rank = train("--config", config, "--stage", "vae", "--vae-steps", 1, "--out",
                       tmp_path / "rank1")
    assert other_rank.exit_code == 0, other_rank.output
    assert notice not in other_rank.output
    monkeypatch.setenv("RANK", "0")
    rank0 = train("--config", config, "--stage", "vae", "--vae-steps", 1, "--out",
                  tmp_path / "rank0")
    assert rank0.exit_code == 0, rank0.output
    assert rank0.output.count(notice) == 1


# ----------------------------------------------------------------------------------------------
# 4. Messages that name what is taken
# ----------------------------------------------------------------------------------------------


def test_init_from_messages_name_what_is_accepted(files, tmp_path):
    out = tmp_path / "run"
    line = refused(train("--config", files["micro"], "--stage", "vae", "--init-from",
                         tmp_path / "nope", "--out", out), out)
    assert "no such run folder, checkpoint, VAE file" in line and "diffusers" in line
    for vae in (files["vae"], files["dvae"]):  # no --stage: the stage that takes a VAE
        line = refused(train("--config", files["micro"], "--init-from", vae, "--out", out), out)
        assert line == (f"Error: --init-from {vae} is a VAE: fine-tune it with --stage vae (to "
                        f"train the diffusion stage on it, pass it with --vae instead)")


def test_the_vae_suite_takes_a_vae_alone(files, tmp_path):
    result = invoke(eval_cli, files["vae"], "--suite", "vae", "--n", 2, "--batch-size", 2,
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["checkpoint"] == str(files["vae"].resolve()) and report["n"] == 2
    folder = load_model(str(files["dvae"]), "vae", True, "cpu")  # a diffusers folder
    imported = import_vae(files["dvae"]).state_dict()
    assert all(torch.equal(t, imported[k]) for k, t in folder.vae.state_dict().items())
    assert folder.cfg.vae == import_vae(files["dvae"]).cfg
    missing = invoke(eval_cli, tmp_path / "nope", "--suite", "vae", "--device", "cpu")
    assert missing.exit_code == 2
    assert "the vae suite also takes a VAE alone" in error_line(missing.output)


# ----------------------------------------------------------------------------------------------
# 5. Weight files get the mode open() gives
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_atomic_writes_get_the_mode_open_gives(tmp_path, umask):
    old = os.umask(umask)
    try:
        weights = save_weights(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
        text = atomic_write(tmp_path / "t.txt", lambda tmp: tmp.write_text("x"), 1)
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    for path in (weights, text, tmp_path / "plain.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.txt", "t.txt", "w.safetensors"]
