"""Follow-ups of the robustness round (issue 13) found by a second new-user trial: a full disk in
safetensors' and torch's writers, failed first starts, hint commands that work, log lines once
per run, leftovers of every stage, model configs GroupNorm cannot build, and messages that say
what to do."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shlex
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import SafetensorError

import t2i.models.io as io
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from t2i.config import ConfigError, DataConfig, apply_overrides, get_preset
from t2i.data import DataError, build_loader
from t2i.data.pack import ShardWriter, jpeg_bytes, sample_json
from t2i.models import checkpoints as ckpts
from t2i.models.io import WeightsError, load_weights, save_weights
from t2i.train import loop
from t2i.train.checkpoint import save_checkpoint
from t2i.train.run import Run
from helpers import MICRO, error_line, micro_cfg, run_stage, toy_state

# `No space left on device` as safetensors' Rust writer reports it (measured on a full tmpfs)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
# torch's zip writer on a full disk when it was given a path: the cause is not in the message
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"


def micro_sets(*extra: str) -> list[str]:
    """MICRO (and `extra`) as t2i-train --set options."""
    return [a for item in MICRO + list(extra) for a in ("--set", item)]


# ----------------------------------------------------------------------------------------------
# F1, F2: a full disk in safetensors' and torch's writers
# ----------------------------------------------------------------------------------------------


def disk_full_when_writing(monkeypatch, name: str) -> None:
    """safetensors' writer fails as on a full disk for the file `name` (written under its
    temporary name `.NAME...`), and writes every other file."""
    real = io.save_file

    def save_file(tensors, path, metadata=None):
        if Path(path).name.startswith(f".{name}"):
            raise SafetensorError(SAFETENSORS_FULL)
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(io, "save_file", save_file)


def test_safetensors_disk_full_is_one_line_with_the_space_and_no_tmp(tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(io, "save_file", full)
    target = tmp_path / "vae.safetensors"
    with pytest.raises(WeightsError) as info:
        save_weights(target, {"w": torch.zeros(256)})
    message = str(info.value)
    assert message.startswith(f"disk full while writing {str(target)!r}: it needs about 1.0 KB")
    assert "are free there" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the temporary file is removed


def test_safetensors_disk_full_in_a_checkpoint_names_the_intact_previous(tmp_path, monkeypatch):
    state = toy_state()
    first = save_checkpoint(tmp_path, state, {"data_position": {"n": 1}}, {}, keep_last=0)
    disk_full_when_writing(monkeypatch, "ema.safetensors")
    with pytest.raises(WeightsError) as info:
        save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=0)
    message = str(info.value)
    assert message.startswith("disk full while writing") and "ckpt-0000005" in message
    assert f"{str(first)!r} is intact" in message and "ckpt-0000005.tmp" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000", "latest"]


def test_vae_export_on_a_full_disk_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    disk_full_when_writing(monkeypatch, "vae.safetensors")
    out = tmp_path / "run"
    assert run_stage(micro_cfg("train.stage=vae"), out) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"Error: disk full while writing {str(out / 'vae.safetensors')!r}")
    assert not list(out.glob(".vae.safetensors*"))


@pytest.mark.parametrize("free, disk_full", [(100, True), (1 << 40, False)])
def test_torch_writer_failure_is_disk_full_when_the_space_is_short(tmp_path, monkeypatch, free,
                                                                   disk_full):
    """torch's `enforce fail ... unexpected pos` does not say why: the free space decides."""
    def failing_save(obj, f, *args, **kwargs):
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(ckpts.torch, "save", failing_save)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(
        1 << 41, (1 << 41) - free, free))
    with pytest.raises(WeightsError) as info:
        save_checkpoint(tmp_path, toy_state(), {}, {}, keep_last=0)
    message = str(info.value)
    assert message.startswith("disk full while writing") is disk_full
    assert ("100.0 B are free there" in message) is disk_full
    assert ("RuntimeError" in message) is not disk_full
    assert list(tmp_path.iterdir()) == []


def test_torch_save_into_an_open_file_shows_the_os_error(tmp_path, monkeypatch):
    """trainer.pt is written through a file object: the ENOSPC behind torch's enforce failure
    is in the error chain, so the disk is called full whatever the free space says."""
    real_open = open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if "trainer.pt" in str(path) and "w" in mode else f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(WeightsError, match=r"^disk full while writing .*ckpt-0000000"):
        save_checkpoint(tmp_path, toy_state(), {}, {}, keep_last=0)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# F3: a failed first start leaves no run folder
# ----------------------------------------------------------------------------------------------


def non_image_source(folder: Path) -> Path:
    """One shard of 5 samples whose `jpg` is text: no usable sample."""
    folder.mkdir(parents=True)
    with ShardWriter(folder, 5) as writer:
        for i in range(5):
            writer.write(f"k{i}", {"jpg": b"not an image", "json": sample_json(f"p {i}", width=16)})
    return folder


def test_failed_first_start_after_setup_removes_its_folder_and_can_run_again(tmp_path):
    data = non_image_source(tmp_path / "data")
    out = tmp_path / "X"
    args = ["--out", out, "--data", data, "--stage", "vae", "--steps", "2", "--device", "cpu",
            *micro_sets("data.workers=0")]
    for _ in range(2):  # the second run is the same command: not "already holds a run"
        result = CliRunner().invoke(train_cli, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        assert "no usable sample" in error_line(result.output)
        assert not out.exists()


def test_failed_first_start_in_an_existing_folder_keeps_the_folder(tmp_path):
    data = non_image_source(tmp_path / "data")
    out = tmp_path / "X"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = CliRunner().invoke(train_cli, [str(a) for a in [
        "--out", out, "--data", data, "--stage", "vae", "--device", "cpu", *micro_sets()]])
    assert result.exit_code == 2
    assert (out / "notes.txt").read_text() == "mine"  # not created by this start: left alone


def test_failed_first_start_exit_1_removes_its_folder(tmp_path):
    """A diverging stage 1 (exit 1) before any checkpoint: nothing saved, no folder left."""
    out = tmp_path / "X"
    result = CliRunner().invoke(train_cli, [str(a) for a in [
        "--out", out, "--stage", "vae", "--device", "cpu",
        *micro_sets("train.vae_lr=1e38", "train.save_every=0")]])
    assert result.exit_code == 1, result.output
    assert "weights became non-finite" in result.output
    assert not out.exists()


def test_interrupted_first_start_that_saved_nothing_removes_its_folder(tmp_path, monkeypatch):
    from t2i.train import vae_stage

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vae_stage, "make_loader", interrupt)
    out = tmp_path / "X"
    result = CliRunner().invoke(train_cli, [str(a) for a in [
        "--out", out, "--stage", "vae", "--device", "cpu", *micro_sets()]])
    assert result.exit_code == 130
    assert f"removed the new run folder {out}" in result.output
    assert "--resume" not in result.output  # no hint to resume a folder that is gone
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# F5: every printed hint command works
# ----------------------------------------------------------------------------------------------


def hint_command(output: str, program: str) -> list[str]:
    [line] = [x.strip() for x in output.splitlines() if x.strip().startswith(program + " ")]
    return shlex.split(line)[1:]


def test_vae_only_run_hints_a_stage_2_command_that_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(train_cli, ["--out", "R", "--stage", "vae", "--device", "cpu",
                                            *micro_sets()])
    assert result.exit_code == 0, result.output
    assert "t2i-sample" not in result.output  # R has no diffusion checkpoint to sample
    args = hint_command(result.output, "t2i-train")
    assert args[:2] == ["--config", "R/config.json"] and "--vae" in args
    second = CliRunner().invoke(train_cli, args + ["--device", "cpu"])
    assert second.exit_code == 0, second.output
    sample = hint_command(second.output, "t2i-sample")
    third = CliRunner().invoke(sample_cli, sample + ["--steps", "2", "--device", "cpu"])
    assert third.exit_code == 0, third.output
    assert sample[2] == "--out" and (tmp_path / sample[3] / "grid.png").is_file()


# ----------------------------------------------------------------------------------------------
# F6: data warnings once per run
# ----------------------------------------------------------------------------------------------


def test_empty_and_cut_shard_lines_print_once_per_run(tmp_path, caplog):
    data = tmp_path / "data"
    with ShardWriter(data, 30) as writer:
        for i in range(30):
            writer.write(f"k{i:03d}", {"jpg": jpeg_bytes(torch_gradient(i), 90),
                                       "json": sample_json(f"picture {i}", width=16)})
    [shard] = sorted(data.glob("*.tar"))
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[2 * 25].offset  # the first file of sample 25
    shard.write_bytes(shard.read_bytes()[:header + 100])  # cut inside a header block
    (data / "b.tar").write_bytes(b"")
    out = tmp_path / "run"
    cfg = micro_cfg(f"data.source={data}", "data.workers=0", "data.max_bad_fraction=1",
                    "train.stage=vae")
    with caplog.at_level(logging.WARNING, logger="t2i.data"):
        assert run_stage(cfg, out) == 0  # 4 steps x 4 + 8 latent-scale batches x 4: 2 loaders
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "skipping 1 empty shard(s): b.tar" in x]) == 1, lines
    assert len([x for x in lines if "stopped reading after sample 24" in x]) == 1, lines
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["bad_samples"]["shard_errors"] >= 1  # still counted


def torch_gradient(seed: int) -> Image.Image:
    """A 16x16 smooth random RGB image."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(4, 4, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(base).resize((16, 16), Image.Resampling.BILINEAR)


# ----------------------------------------------------------------------------------------------
# F7: leftovers of every stage are cleaned at a successful start
# ----------------------------------------------------------------------------------------------


def test_resume_in_stage_2_cleans_stage_1_leftovers_too(micro_run_copy):
    run = micro_run_copy
    leftovers = [run / "vae" / ".trash-ckpt-0000001", run / "vae" / "ckpt-0000003.tmp",
                 run / "unet" / ".trash-ckpt-0000001"]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    assert run_stage(Run(run).read_config(), run, resume=True) == 0
    assert not any(p.exists() for p in leftovers)
    assert [p.name for p in ckpts.complete_checkpoints(run / "vae")] == [
        "ckpt-0000002", "ckpt-0000004"]


# ----------------------------------------------------------------------------------------------
# F8: GroupNorm groups that divide every width; betas that grow
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("unet.norm_groups=7", "unet.norm_groups=7 must divide every channel width of the UNET "
                           "(widths [32, 64, 64])"),
    ("vae.norm_groups=3", "vae.norm_groups=3 must divide every channel width of the VAE "
                          "(widths [16, 32, 64])"),
    ("unet.norm_groups=64", "unet.norm_groups=64 must divide every channel width"),
])
def test_norm_groups_that_do_not_divide_a_width_are_refused(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(get_preset("tiny"), [override])


@pytest.mark.parametrize("override", ["unet.norm_groups=32", "vae.norm_groups=16",
                                      "unet.norm_groups=1"])
def test_norm_groups_that_divide_every_width_are_accepted(override):
    apply_overrides(get_preset("tiny"), [override])


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_presets_pass_the_norm_group_check(preset):
    apply_overrides(get_preset(preset), [])


def test_cli_refuses_norm_groups_before_training(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(train_cli, ["--out", str(out), "--set", "unet.norm_groups=7"])
    assert result.exit_code == 2 and "unet.norm_groups=7" in error_line(result.output)
    assert not out.exists()


@pytest.mark.parametrize("schedule, refused", [
    ("linear", True), ("scaled_linear", True), ("squaredcos_cap_v2", False)])
def test_decreasing_betas_are_refused_for_linear_schedules(schedule, refused):
    overrides = [f"schedule.beta_schedule={schedule}", "schedule.beta_start=0.5",
                 "schedule.beta_end=0.1"]
    if refused:
        with pytest.raises(ConfigError, match="beta_end=0.1 is below schedule.beta_start=0.5"):
            apply_overrides(get_preset("tiny"), overrides)
    else:  # cosine betas do not use beta_start / beta_end
        apply_overrides(get_preset("tiny"), overrides)


# ----------------------------------------------------------------------------------------------
# Messages that say what to do
# ----------------------------------------------------------------------------------------------


def test_resume_with_another_batch_size_says_to_drop_it():
    cfg = DataConfig(source="shapes", resolution=16)
    first = build_loader(cfg, batch_size=8, tokenize=lambda p: torch.zeros(len(p), 77), seed=0)
    with pytest.raises(DataError) as info:
        build_loader(cfg, batch_size=4, tokenize=lambda p: torch.zeros(len(p), 77), seed=0,
                     position=first.position())
    assert str(info.value) == (
        "cannot resume the data position exactly: it was saved with batch_size=8, now "
        "batch_size=4; drop --batch-size to resume, or start a new run with another --out")


def test_damaged_vae_weights_on_resume_say_how_to_get_them_back(micro_run_copy, capsys):
    run = micro_run_copy
    original = {k: v.clone() for k, v in load_weights(run / "vae.safetensors")[0].items()}
    (run / "vae.safetensors").write_bytes(b"\x00garbage" * 64)
    cfg = Run(run).read_config()
    assert run_stage(cfg, run, resume=True) == 2
    line = error_line(capsys.readouterr().err)
    assert "vae.safetensors" in line and line.endswith(
        f"delete it and resume: it is exported again from stage 1's last checkpoint "
        f"(rm {run / 'vae.safetensors'}; t2i-train --resume {run})")
    (run / "vae.safetensors").unlink()  # do what it says
    assert run_stage(cfg, run, resume=True) == 0
    again = load_weights(run / "vae.safetensors")[0]
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def test_vae_weights_hint_only_for_a_run_that_exported_them(tmp_path):
    from t2i.train.unet_stage import vae_repair_hint
    run = Run(tmp_path)
    cfg = micro_cfg()
    assert vae_repair_hint(cfg, run, run.vae_weights) == ""  # no stage-1 checkpoint
    ckpt = save_checkpoint(tmp_path / "vae", toy_state(), {}, {}, keep_last=0)
    assert ckpt.is_dir() and vae_repair_hint(cfg, run, run.vae_weights).startswith("; delete it")
    assert vae_repair_hint(cfg, run, tmp_path / "other.safetensors") == ""  # a --vae file
    assert vae_repair_hint(micro_cfg("train.stage=unet"), run, run.vae_weights) == ""


def test_sample_steps_out_of_range_names_the_option(micro_run, tmp_path):
    result = CliRunner().invoke(sample_cli, [str(micro_run), "a cat", "--steps", "1001",
                                             "--out", str(tmp_path / "s"), "--device", "cpu"])
    assert result.exit_code == 2
    line = error_line(result.output)
    assert line == ("Error: --steps 1001 must be between 1 and 1000 (the run's "
                    "schedule.num_train_timesteps)")


@pytest.mark.parametrize("stage, option", [("vae", "--vae-lr"), ("unet", "--lr")])
def test_nonfinite_stops_name_the_stage_learning_rate_option(tmp_path, stage, option):
    settings = loop.LoopSettings(stage=stage, total_steps=10, global_batch=2, log_every=1,
                                 sample_every=0, save_every=0, keep_last=0, max_nonfinite=3,
                                 show_progress=False)
    assert f"Lower {option}, raise --warmup" in loop.nonfinite_message(settings, 3, 3, tmp_path)
    state = toy_state()
    with torch.no_grad():
        state.model.bias.fill_(float("nan"))
    with pytest.raises(loop.TrainingError, match=f"Lower the learning rate \\({option}\\)"):
        loop.refuse_nonfinite(state, stage, tmp_path)


@pytest.mark.parametrize("text", ["inf", "Infinity", "-inf", "-Infinity", "nan", "NaN"])
def test_non_finite_values_get_one_wording(text):
    with pytest.raises(ConfigError) as info:
        apply_overrides(get_preset("tiny"), [f"train.vae_lr={text}"])
    assert str(info.value).startswith("config key 'train.vae_lr': expected a finite number, "
                                      "got ")
    assert "'" not in str(info.value).split("got ")[1]
