"""The same rule wherever the same mistake can be made:

- an explicit `--set vae.<architecture key>` that disagrees with a VAE that brings its own
  architecture is refused for stage 2's `--vae` as for stage 1's `--init-from` (one shared
  check, init_vae.check_explicit); the file's own value is accepted;
- options that only a new run reads (`--config`, `--preset`) and `--out` are refused with an
  explicit `--resume RUN`, and named in a `note:` when `--resume auto` resumes;
- `t2i-eval --suite vae` scores a VAE file (one set of weights): its report says
  "weights": "file" and `--no-ema` is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from t2i.cli.eval import main as eval_cli
from t2i.cli.train import main as train_cli
from t2i.config import ConfigError, apply_overrides, get_preset
from t2i.train.init_vae import with_vae_file
from t2i.models.io import load_weights, save_weights
from helpers import MICRO, error_line, invoke, micro_cfg, save_random_vae

FILE_Z = 3  # the imported VAE's z_channels; the tiny preset's is 4


def sets(*items: str) -> list[str]:
    return [a for kv in (*MICRO, *items) for a in ("--set", kv)]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    """A t2i vae.safetensors converted from a foreign VAE (metadata stage "import": it brings
    its architecture), z_channels 3."""
    path = tmp_path_factory.mktemp("imported") / "vae.safetensors"
    save_random_vae(micro_cfg(*(f"{key}={FILE_Z}" for key in
                                  ("vae.z_channels", "unet.in_channels", "unet.out_channels"))), path)
    tensors, metadata = load_weights(path)
    save_weights(path, tensors, {**metadata, "stage": "import"})
    return path


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> Path:
    """A diffusers AutoencoderKL folder (random weights) with latent_channels 3."""
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                    norm_num_groups=4, latent_channels=FILE_Z, sample_size=16,
                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                    up_block_types=("UpDecoderBlock2D",) * 2)
    folder = tmp_path_factory.mktemp("diffusers") / "vae"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("source", ["imported", "diffusers_folder"])
def test_stage2_vae_refuses_a_set_that_disagrees_with_the_file(source, request, tmp_path):
    vae = request.getfixturevalue(source)
    out = tmp_path / "run"
    result = invoke(train_cli, *sets("vae.z_channels=4"), "--stage", "unet", "--vae", vae,
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "vae.z_channels=4" in line and f"vae.z_channels is {FILE_Z}" in line
    assert str(vae) in line and "--vae" in line
    assert not out.exists()  # nothing made


def test_stage2_vae_accepts_a_set_equal_to_the_file(imported, tmp_path):
    out = tmp_path / "run"
    result = invoke(train_cli, *sets(f"vae.z_channels={FILE_Z}"), "--stage", "unet",
                    "--vae", imported, "--steps", 1, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert config["vae"]["z_channels"] == FILE_Z == config["unet"]["in_channels"]


def test_stage1_init_from_accepts_a_set_equal_to_the_file_and_refuses_another(imported):
    explicit = [*MICRO, "train.stage=vae", f"vae.z_channels={FILE_Z}"]
    cfg = apply_overrides(get_preset("tiny"), explicit, check=False)  # as t2i-train resolves it
    adopted = with_vae_file(cfg, str(imported), explicit)
    assert adopted.vae.z_channels == FILE_Z == adopted.unet.in_channels == adopted.unet.out_channels
    other = [*MICRO, "train.stage=vae", "vae.z_channels=4"]
    with pytest.raises(ConfigError, match=f"vae.z_channels=4 .*vae.z_channels is {FILE_Z}"):
        with_vae_file(apply_overrides(get_preset("tiny"), other, check=False), str(imported),
                      other)


@pytest.fixture
def other_config(tmp_path) -> Path:
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"train": {"unet_steps": 9}}))
    return path


@pytest.mark.parametrize("extra", [("--config", "FILE"), ("--preset", "small"),
                                   ("--out", "ELSEWHERE")], ids=["config", "preset", "out"])
def test_resume_of_a_named_run_refuses_what_it_would_drop(extra, micro_run_copy, other_config,
                                                          tmp_path):
    option, value = extra
    value = {"FILE": other_config, "ELSEWHERE": tmp_path / "elsewhere"}.get(value, value)
    config = (micro_run_copy / "config.json").read_bytes()
    result = invoke(train_cli, "--resume", micro_run_copy, option, value, "--device", "cpu")
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert f"{option} {value}" in line and f"--resume {micro_run_copy}" in line
    assert (micro_run_copy / "config.json").read_bytes() == config
    assert not (tmp_path / "elsewhere").exists()


def test_resume_auto_names_the_config_it_does_not_read(micro_run_copy, other_config):
    config = (micro_run_copy / "config.json").read_bytes()
    result = invoke(train_cli, "--resume", "auto", "--out", micro_run_copy, "--config",
                    other_config, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (f"note: --config {other_config} not read: resuming {micro_run_copy}, which uses "
            f"its own {micro_run_copy / 'config.json'}") in result.output
    assert (micro_run_copy / "config.json").read_bytes() == config  # unet_steps 9 not taken


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory) -> Path:
    return save_random_vae(micro_cfg(), tmp_path_factory.mktemp("vae") / "vae.safetensors")


@pytest.mark.parametrize("source", ["vae_file", "micro_run"])
def test_vae_suite_reports_the_file_and_refuses_no_ema(source, request, tmp_path):
    path = request.getfixturevalue(source)
    refused = invoke(eval_cli, path, "--suite", "vae", "--n", 2, "--no-ema", "--out",
                     tmp_path / "refused", "--device", "cpu")
    assert refused.exit_code == 2, refused.output
    assert "--no-ema" in error_line(refused.output)
    assert not (tmp_path / "refused").exists()
    result = invoke(eval_cli, path, "--suite", "vae", "--n", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["weights"] == "file"
    file = path if path.is_file() else path / "vae.safetensors"  # not RUN/unet/ckpt-N
    assert report["checkpoint"] == str(file.resolve())


def test_summary_with_resume_describes_the_runs_model(micro_run_copy):
    """--summary --resume RUN counts the run's own model (its config.json), not the default
    preset's."""
    from t2i.config import config_from_json
    from t2i.models.summary import format_summary, summarize
    run_summary = invoke(train_cli, "--resume", micro_run_copy, "--summary")
    preset_summary = invoke(train_cli, "--summary")
    assert run_summary.exit_code == 0 and preset_summary.exit_code == 0, run_summary.output
    own = config_from_json((micro_run_copy / "config.json").read_text())
    assert run_summary.output.strip() == format_summary(summarize(own)).strip()
    assert run_summary.output != preset_summary.output
