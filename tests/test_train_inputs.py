"""t2i-train and its config on inputs a user trial got wrong: files that are not UTF-8 or not
weights, unknown --set keys, a resume that asks for fewer steps than were done, a run started
with relative paths and resumed from another folder, a locked run resumed. Each is one line,
exit 2, nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from t2i.cli.data import main as data_cli
from t2i.cli.train import main as train_cli
from t2i.cli.train_run import with_absolute_paths
from t2i.config import ConfigError, apply_overrides, load_file
from t2i.data.sources import absolute_source
from t2i.models.io import WeightsError, read_state_dict
from t2i.train.run import locked
from helpers import MICRO, error_line, invoke, micro_cfg, run_stage, write_image_shards


def sets(*items: str) -> list[str]:
    return [arg for item in (*MICRO, *items) for arg in ("--set", item)]


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"\xff\xfe[train]\n")
    with pytest.raises(ConfigError, match=r"bad.toml' is not UTF-8 text"):
        load_file(path)
    result = invoke(train_cli, "--config", path)
    assert result.exit_code == 2 and "is not UTF-8 text" in error_line(result.output)
    with pytest.raises(ConfigError, match="is a folder"):
        load_file(tmp_path)


def test_an_unknown_set_key_quotes_the_override_and_lists_the_keys():
    with pytest.raises(ConfigError) as err:
        apply_overrides(micro_cfg(), ["train.nope=3"])
    message = str(err.value)
    assert message.startswith("--set 'train.nope=3': unknown config key 'train.nope'")
    assert "unet_steps" in message and "key," not in message  # fields only, not ClassVars
    with pytest.raises(ConfigError, match=r"--set '=3': unknown config key ''"):
        apply_overrides(micro_cfg(), ["=3"])


def test_a_missing_choice_option_is_one_line():
    from t2i.cli.eval import main as eval_cli
    result = invoke(eval_cli, "runs/none")
    assert result.exit_code == 2
    assert error_line(result.output) == ("Error: Missing option '--suite'. Choose from: shapes, "
                                         "vae, fid, agreement, val-loss")
    assert len(result.output.strip().splitlines()) == 1


def test_a_file_that_is_not_weights_says_so_and_other_formats_load(tmp_path):
    import torch
    from safetensors.torch import save_file

    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n")
    with pytest.raises(WeightsError) as err:
        read_state_dict(text)
    assert "is not a weights file" in str(err.value) and "IndexError" not in str(err.value)
    result = invoke(data_cli, "convert-vae", text, tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "is not a weights file" in error_line(result.output)
    tensors = {"a": torch.arange(3.0)}
    torch.save(tensors, tmp_path / "zip.pt")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(tensors, str(tmp_path / "safetensors.bin"))  # safetensors under another name
    for name in ("zip.pt", "legacy.pt", "safetensors.bin"):
        assert torch.equal(read_state_dict(tmp_path / name)["a"], tensors["a"])


def test_resume_with_fewer_steps_than_done_is_refused_and_changes_nothing(micro_run_copy):
    config = (micro_run_copy / "config.json").read_bytes()
    result = invoke(train_cli, "--resume", micro_run_copy, "--steps", 3, "--device", "cpu")
    assert result.exit_code == 2
    assert error_line(result.output) == (
        f"Error: train.unet_steps=3 with --resume {micro_run_copy}: its unet stage is at step 4 "
        f"already; give --steps 4 or more, or start a new run from it with --init-from")
    assert (micro_run_copy / "config.json").read_bytes() == config
    # the checkpoint named with --resume is the one compared: step 2 of 3 is fine
    named = micro_run_copy / "unet" / "ckpt-0000002"
    vae = invoke(train_cli, "--resume", named, "--stage", "vae", "--steps", 1, "--device", "cpu")
    assert vae.exit_code == 2 and "train.vae_steps=1" in error_line(vae.output)
    assert "--stage vae --steps 4 or more" in error_line(vae.output)


def test_a_locked_run_resumed_is_told_to_wait_not_to_pass_out(micro_run_copy):
    with locked(micro_run_copy):
        result = invoke(train_cli, "--resume", micro_run_copy, "--device", "cpu")
    line = error_line(result.output)
    assert result.exit_code == 2 and line.endswith("wait for it to end") and "--out" not in line


def test_local_paths_become_absolute_remote_ones_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = "shards, hf://jackyhate/text-to-image-2M,https://host/a.tar,more/*.tar,,~/x"
    assert absolute_source(source) == ",".join([
        str(tmp_path / "shards"), "hf://jackyhate/text-to-image-2M", "https://host/a.tar",
        str(tmp_path / "more" / "*.tar"), os.path.expanduser("~/x")])
    assert absolute_source("shapes") == "shapes"
    cfg = micro_cfg("data.source=shards", "data.val_source=val", "text.weights=w.safetensors")
    new = with_absolute_paths(cfg)
    assert (new.data.source, new.data.val_source, new.text.weights) == (
        str(tmp_path / "shards"), str(tmp_path / "val"), str(tmp_path / "w.safetensors"))
    # on a resume, what the saved config already says stays as it is (its data position names it)
    assert with_absolute_paths(cfg, saved=cfg) == cfg


def test_a_run_started_with_a_relative_data_path_resumes_from_another_folder(tmp_path,
                                                                             monkeypatch):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    write_image_shards(work / "shards", shards=2, per_shard=8, size=16)
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    first = invoke(train_cli, *sets("train.vae_steps=2", "train.save_every=1"), "--stage", "vae",
                   "--data", "shards", "--out", "run", "--device", "cpu")
    assert first.exit_code == 0, first.output
    config = json.loads((work / "run" / "config.json").read_text())
    assert config["data"]["source"] == str(work / "shards")
    monkeypatch.chdir(elsewhere)
    again = invoke(train_cli, "--resume", work / "run", "--set", "train.vae_steps=3", "--device",
                   "cpu")
    assert again.exit_code == 0, again.output
    steps = [json.loads(x)["step"] for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    # and --data given again, relative to where the command runs, names the same source
    monkeypatch.chdir(work)
    same = invoke(train_cli, "--resume", "run", "--set", "train.vae_steps=4", "--data", "./shards",
                  "--device", "cpu")
    assert same.exit_code == 0, same.output


def test_stage_2_without_a_vae_does_not_point_into_the_new_run(tmp_path):
    out = tmp_path / "new"
    result = invoke(train_cli, *sets(), "--stage", "unet", "--out", out, "--device", "cpu")
    line = error_line(result.output)
    assert result.exit_code == 2 and "no trained VAE (stage 2 alone, and no --vae)" in line
    assert str(out) not in line and not out.exists()


def test_a_file_that_is_not_safetensors_says_so_plainly(tmp_path):
    import torch
    from t2i.models.io import load_weights

    text = tmp_path / "prompts.txt"
    text.write_text("a red circle\n")
    torch.save({"a": torch.ones(1)}, tmp_path / "pickle.pt")
    for path in (text, tmp_path / "pickle.pt"):
        with pytest.raises(WeightsError) as err:
            load_weights(path)
        assert str(err.value) == f"{str(path)!r} is not a safetensors file"


def test_a_set_without_a_value_names_set():
    with pytest.raises(ConfigError) as err:
        apply_overrides(micro_cfg(), ["train.vae_steps"])
    assert str(err.value) == "--set 'train.vae_steps' must look like key.sub=value"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_sheet_in_a_folder_that_cannot_be_made_is_refused_before_the_scan(tmp_path):
    result = invoke(data_cli, "inspect", tmp_path / "no-shards-here", "--sheet", "/proc/nope/s.jpg")
    line = error_line(result.output)
    assert result.exit_code == 2 and "--sheet" in line and "/proc" in line  # root or not
    assert "no-shards-here" not in line  # refused at parse time, before the source is read


def test_cuda_n_under_torchrun_is_refused(monkeypatch):
    from t2i.cli.common import UserError, pick_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="would put all 2 processes on one GPU: pass --device cuda"):
        pick_device("cuda:0")
    assert pick_device("cpu").type == "cpu"  # cpu and plain cuda stay allowed


def test_non_finite_moments_are_a_corrupt_latent_sample():
    import torch
    from safetensors.torch import save
    from t2i.data.errors import BadSample
    from t2i.data.latent_shards import moments_from_bytes

    moments = torch.zeros(8, 2, 2)
    assert torch.equal(moments_from_bytes(save({"moments": moments})), moments)
    moments[3, 1, 0] = float("nan")
    with pytest.raises(BadSample, match="non-finite moments") as err:
        moments_from_bytes(save({"moments": moments}))
    assert err.value.kind == "corrupt_latent"


def test_overlapping_source_items_name_each_shard_once(tmp_path, monkeypatch):
    from t2i.data.sources import resolve_shards

    write_image_shards(tmp_path / "d", shards=2, per_shard=2, size=16)
    monkeypatch.chdir(tmp_path)
    urls = [s.url for s in resolve_shards("d,d/data_000000.tar,./d/*.tar")]
    assert urls == ["d/data_000000.tar", "d/data_000001.tar"]


def test_a_read_only_run_folder_resumed_is_one_line(micro_run_copy, monkeypatch):
    """(A bind mount read-only: root ignores file modes, so os.open is made to fail as there.)"""
    import errno

    from t2i.train import run as run_module

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(run_module.os, "open", read_only)
    result = invoke(train_cli, "--resume", micro_run_copy, "--device", "cpu")
    assert result.exit_code == 2
    assert error_line(result.output) == (
        f"Error: {str(micro_run_copy)!r} is not writable (Read-only file system); the run folder "
        f"must be: copy it somewhere writable to continue it")


def test_a_resume_with_nothing_to_train_keeps_the_saved_settings(micro_run_copy, caplog):
    config = (micro_run_copy / "config.json").read_bytes()
    result = invoke(train_cli, "--resume", micro_run_copy, "--lr", "5e-4", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (micro_run_copy / "config.json").read_bytes() == config
    assert "nothing to train, so the changed settings were not saved" in caplog.text
    # with steps left the same change is saved, as the settings the stage trains with
    more = invoke(train_cli, "--resume", micro_run_copy, "--lr", "5e-4", "--steps", 5,
                  "--device", "cpu")
    assert more.exit_code == 0, more.output
    saved = json.loads((micro_run_copy / "config.json").read_text())["train"]
    assert saved["unet_lr"] == 5e-4 and saved["unet_steps"] == 5


def test_more_steps_on_resume_note_the_learning_rate_jump(micro_run_copy):
    """Cosine over train.unet_steps: at step 4 of 4 (warm-up 2) the rate is 0.1 x base; over 8
    steps, step 4 is a third of the decay: (0.1 + 0.9 * 0.75) x base."""
    from t2i.cli.train_run import schedule_notes
    from t2i.train.run import Run

    run = Run(micro_run_copy)
    saved = run.read_config()
    base = saved.train.unet_lr
    notes = schedule_notes(saved, apply_overrides(saved, ["train.unet_steps=8"]), run, None)
    assert notes == [f"the unet stage continues at step 4 with learning rate "
                     f"{0.775 * base:.3g}, not the {0.1 * base:.3g} its saved settings give "
                     f"there (the schedule is over train.unet_steps=8, was 4; README, Resume)"]
    assert schedule_notes(saved, saved, run, None) == []  # nothing changed: no note


def test_the_learning_rate_note_comes_after_the_checks_never_before_a_refusal(micro_run_copy):
    """A resume refused by a later check (here the data position's seed) printed the note
    first, saying the run continues when it does not; an accepted one prints it after the
    `resuming:` line."""
    refused = invoke(train_cli, "--resume", micro_run_copy, "--steps", 8, "--seed", 5)
    assert refused.exit_code == 2, refused.output
    assert "note: the unet stage continues" not in refused.output
    accepted = invoke(train_cli, "--resume", micro_run_copy, "--steps", 5, "--device", "cpu")
    assert accepted.exit_code == 0, accepted.output
    lines = accepted.output.splitlines()
    resumed = next(i for i, line in enumerate(lines) if line.startswith("resuming: "))
    assert lines[resumed + 1].startswith("note: the unet stage continues at step 4")


def test_a_missing_val_source_is_named(tmp_path):
    shards = write_image_shards(tmp_path / "shards", shards=2, per_shard=2)
    result = invoke(train_cli, "--data", shards, "--stage", "vae", "--out", tmp_path / "run",
                    "--device", "cpu", *sets(f"data.val_source={tmp_path / 'nope'}"))
    assert result.exit_code == 2
    assert error_line(result.output) == (f"Error: data.val_source: data source "
                                         f"{str(tmp_path / 'nope')!r} does not exist")


def test_an_unquoted_glob_gets_a_hint(tmp_path):
    result = invoke(train_cli, "--data", "a/data_0.tar", "a/data_1.tar")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert line.startswith("Error: Got unexpected extra argument (a/data_1.tar)")
    assert "quote it, as in 'shards/data_*.tar'" in line


def test_a_run_vae_of_another_preset_names_the_config_to_start_from(micro_run, tmp_path):
    """A tiny run's VAE given to a small run: the first error names the VAE and the config to
    use, not data.resolution (which the small VAE's factor decides) or a list of tensor keys."""
    out = tmp_path / "run"
    result = invoke(train_cli, "--preset", "small", "--stage", "unet", "--vae", micro_run,
                    "--out", out, "--device", "cpu")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert line.startswith(f"Error: --vae {micro_run} has another VAE architecture than this "
                           f"run's config (it was trained by a tiny run, this is a small run): "
                           f"vae.")
    assert line.endswith(f"start stage 2 from the settings it was trained with: --config "
                         f"{micro_run / 'config.json'} --stage unet")
    assert not out.exists()


def test_an_unquoted_glob_given_to_encode_gets_the_hint_too(tmp_path):
    """`t2i-data encode shards/data_*.tar OUT`: the second shard lands on OUT, a file."""
    shards = write_image_shards(tmp_path / "shards", shards=2, per_shard=1)
    first, second = sorted(shards.glob("*.tar"))
    result = invoke(data_cli, "encode", first, second, "out", "--vae", "v.safetensors")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "is a file" in line and "quote it, as in 'shards/data_*.tar'" in line


def test_after_stage_1_on_shards_the_hint_names_the_latent_route(tmp_path):
    from t2i.cli.launch import next_step_hint
    from t2i.train.run import Run

    run = Run(tmp_path / "run")
    on_shards = micro_cfg("train.stage=vae", f"data.source={tmp_path / 'shards'}")
    lines = next_step_hint(on_shards, run).splitlines()
    assert lines[1].strip().startswith("t2i-train --config") and "--stage unet" in lines[1]
    assert lines[3].strip() == (f"t2i-data encode {tmp_path / 'shards'} LATENTS --vae "
                                f"{run.dir} --resolution 16")
    assert len(next_step_hint(micro_cfg("train.stage=vae"), run).splitlines()) == 2  # shapes


def test_steps_on_the_resume_of_a_stage_1_run_are_the_vae_steps(tmp_path):
    """`--resume RUN --steps N` of a `--stage vae` run set train.unet_steps, which the run never
    uses, and then said the VAE had nothing to train "give more steps"."""
    run = tmp_path / "run"
    assert run_stage(micro_cfg("train.stage=vae", "train.vae_steps=2"), run) == 0
    result = invoke(train_cli, "--resume", run, "--steps", 3, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert (run / "vae" / "ckpt-0000003").is_dir()
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["vae_steps"], saved["unet_steps"]) == (3, 4)
