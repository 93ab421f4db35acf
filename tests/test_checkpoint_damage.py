"""Damaged files: a full disk during a checkpoint write, truncated / garbage / bit-flipped weights
and trainer files, weights without config metadata, a garbage or missing config.json. Each is
one `Error:` line (or, when resuming a run, a fall-back to the newest intact checkpoint), and the
sha256 recorded at write time catches changed bytes that still parse."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from t2i.models import checkpoints as ckpts
from t2i.models.io import WeightsError, file_sha256, load_weights, read_metadata, save_weights
from t2i.train.checkpoint import load_checkpoint, save_checkpoint
from t2i.train.latents import LatentCache
from helpers import error_line, micro_cfg, run_stage, toy_state


def flip_byte(path: Path, offset_from_end: int = 8) -> None:
    """Change one byte inside the tensor data (the end of the file), keeping the size."""
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage" * 64)


@pytest.fixture
def run(micro_run_copy) -> Path:
    """Both stages, unet checkpoints at steps 2 and 4 (a copy of conftest's micro_run)."""
    assert [p.name for p in ckpts.complete_checkpoints(micro_run_copy / "unet")] == [
        "ckpt-0000002", "ckpt-0000004"]
    return micro_run_copy


# ----------------------------------------------------------------------------------------------
# Disk full
# ----------------------------------------------------------------------------------------------


DISK_FULL = {
    "enospc": OSError(errno.ENOSPC, "No space left on device"),
    "torch-enforce": RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                  "failed writing file data/0: file write failed"),
}


@pytest.mark.parametrize("kind", list(DISK_FULL))
def test_disk_full_checkpoint_write_is_one_message_and_keeps_the_previous(
        tmp_path, monkeypatch, kind):
    state = toy_state()
    first = save_checkpoint(tmp_path, state, {"data_position": {"n": 1}}, {}, keep_last=0)

    def full(*args, **kwargs):
        raise DISK_FULL[kind]

    monkeypatch.setattr(ckpts.torch, "save", full)
    with pytest.raises(WeightsError) as info:
        save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=0)
    monkeypatch.undo()
    message = str(info.value)
    assert "\n" not in message
    assert "disk full" in message and "ckpt-0000005" in message and "needs about" in message
    assert "free" in message and f"{str(first)!r} is intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000000", "latest"]  # no .tmp
    assert ckpts.latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first, toy_state())[1]["data_position"] == {"n": 1}


def test_disk_full_in_safetensors_write_names_the_space_too(tmp_path, monkeypatch):
    import t2i.models.io as io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(WeightsError, match=r"disk full .*ckpt-0000000.*no earlier checkpoint"):
        save_checkpoint(tmp_path, toy_state(), {}, {}, keep_last=0)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_during_training_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    calls = []
    real_save = torch.save

    def full_on_second_checkpoint(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise DISK_FULL["torch-enforce"]
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpts.torch, "save", full_on_second_checkpoint)
    out = tmp_path / "run"
    assert run_stage(micro_cfg("train.stage=vae"), out) == 2
    line = error_line(capsys.readouterr().err)
    assert "disk full" in line and "ckpt-0000004" in line and "ckpt-0000002' is intact" in line
    assert sorted(p.name for p in (out / "vae").iterdir()) == ["ckpt-0000002", "latest"]


# ----------------------------------------------------------------------------------------------
# Damaged weights: sampling and evaluation
# ----------------------------------------------------------------------------------------------


DAMAGE = {"truncated": truncate, "garbage": garbage, "flipped": flip_byte}


@pytest.mark.parametrize("how", list(DAMAGE))
@pytest.mark.parametrize("target", ["unet/ckpt-0000004/ema.safetensors", "vae.safetensors"])
def test_damaged_weights_are_one_line_in_sample(run, tmp_path, how, target):
    DAMAGE[how](run / target)
    result = CliRunner().invoke(sample_cli, [str(run), "a red circle", "--steps", "2",
                                             "--out", str(tmp_path / "img")])
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert Path(target).name in line and "damaged" in line
    if target.startswith("unet"):  # names the earlier checkpoint to sample from instead
        assert "ckpt-0000002" in line


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_damaged_text_encoder_file_is_one_line_in_train(tmp_path, suffix):
    junk = tmp_path / f"junk{suffix}"
    garbage(junk)
    result = CliRunner().invoke(train_cli, ["--text-encoder", str(junk), "--summary"])
    assert result.exit_code == 2
    assert f"junk{suffix}" in error_line(result.output)


def test_damaged_weights_are_one_line_in_eval(run):
    garbage(run / "unet" / "ckpt-0000004" / "ema.safetensors")
    result = CliRunner().invoke(eval_cli, [str(run), "--suite", "shapes", "--n", "8",
                                           "--steps", "2"])
    assert result.exit_code == 2, result.output
    assert "ema.safetensors" in error_line(result.output)


def test_weights_without_config_metadata_is_one_line(run, tmp_path):
    ckpt = run / "unet" / "ckpt-0000004"
    tensors, _ = load_weights(ckpt / "ema.safetensors")
    save_weights(ckpt / "ema.safetensors", tensors, {"stage": "unet"})  # no config
    (ckpt / ckpts.MANIFEST).unlink()  # as if written by hand, without a manifest
    result = CliRunner().invoke(sample_cli, [str(ckpt), "a red circle", "--steps", "2",
                                             "--out", str(tmp_path / "img")])
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "ema.safetensors" in line and "no `config` metadata" in line


# ----------------------------------------------------------------------------------------------
# sha256: manifests and the digest inside each weights file
# ----------------------------------------------------------------------------------------------


def test_manifest_records_each_file_and_catches_flipped_bytes(tmp_path):
    ckpt = save_checkpoint(tmp_path, toy_state(), {}, {"config": "{}"}, keep_last=0)
    manifest = json.loads((ckpt / ckpts.MANIFEST).read_text())["files"]
    assert set(manifest) == set(ckpts.FILES)
    for name in ckpts.FILES:
        assert manifest[name] == {"bytes": (ckpt / name).stat().st_size,
                                  "sha256": file_sha256(ckpt / name)}
    assert ckpts.damage(ckpt) is None
    flip_byte(ckpt / "model.safetensors", offset_from_end=2)
    assert load_weights(ckpt / "model.safetensors", verify=False)  # still parses...
    assert "sha256 mismatch" in ckpts.damage(ckpt)  # ...but is caught
    with pytest.raises(WeightsError, match=r"model\.safetensors.*damaged"):
        load_checkpoint(ckpt, toy_state())


def test_weights_file_digest_catches_changed_tensor_bytes(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", {"w": torch.arange(64.0)}, {"a": "1"})
    assert read_metadata(path) == {"a": "1"}  # the digest is not part of the caller's metadata
    flip_byte(path, offset_from_end=4)
    with pytest.raises(WeightsError, match="damaged"):
        load_weights(path)
    from safetensors.torch import save_file  # a foreign file without a digest loads as is
    save_file({"w": torch.ones(2)}, str(tmp_path / "foreign.safetensors"))
    assert torch.equal(load_weights(tmp_path / "foreign.safetensors")[0]["w"], torch.ones(2))


def test_damaged_latent_cache_is_set_aside_and_rebuilt(tmp_path):
    identity = {"vae_sha256": "x"}
    cache = LatentCache(tmp_path, identity)
    cache.moments(["a"], torch.zeros(1, 3, 4, 4),
                  lambda x: (torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)))
    cache.save()
    assert LatentCache(tmp_path, identity).entries.keys() == {"a"}
    flip_byte(cache.path, offset_from_end=4)
    reopened = LatentCache(tmp_path, identity)
    assert reopened.entries == {} and "damaged" in reopened.discarded


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints when resuming
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how,name", [("garbage", "trainer.pt"), ("truncated", "trainer.pt"),
                                      ("flipped", "model.safetensors")])
def test_resume_falls_back_to_the_newest_intact_checkpoint(run, caplog, how, name):
    DAMAGE[how](run / "unet" / "ckpt-0000004" / name)
    (run / "unet" / "ckpt-0000009.tmp").mkdir()  # leftovers of killed processes
    (run / "unet" / ".trash-ckpt-0000001").mkdir()
    with caplog.at_level(logging.WARNING, logger="t2i.train"):
        result = CliRunner().invoke(train_cli, ["--resume", "auto", "--out", str(run),
                                                "--steps", "6", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert "ckpt-0000004" in caplog.text and name in caplog.text and "ckpt-0000002" in caplog.text
    unet_steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text()
                                         .splitlines()) if r["stage"] == "unet"]
    assert unet_steps == [1, 2, 3, 4, 5, 6]  # resumed at 2; the old 3-4 records were cut
    assert sorted(p.name for p in (run / "unet").iterdir()) == [
        "ckpt-0000002", "ckpt-0000004", "ckpt-0000006", "latest"]
    assert ckpts.damage(run / "unet" / "ckpt-0000004") is None  # rewritten on the way


def test_named_damaged_checkpoint_is_an_error(run):
    garbage(run / "unet" / "ckpt-0000002" / "trainer.pt")
    config = (run / "config.json").read_bytes()
    result = CliRunner().invoke(train_cli, ["--resume", str(run / "unet" / "ckpt-0000002"),
                                            "--steps", "6"])
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "ckpt-0000002" in line and "trainer.pt" in line
    assert (run / "config.json").read_bytes() == config


def test_every_checkpoint_damaged_is_an_error_naming_them(run):
    for step in ("ckpt-0000002", "ckpt-0000004"):
        truncate(run / "unet" / step / "ema.safetensors")
    result = CliRunner().invoke(train_cli, ["--resume", "auto", "--out", str(run), "--steps", "6"])
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "no intact checkpoint" in line and "ckpt-0000002" in line and "ckpt-0000004" in line


def test_garbage_or_missing_config_json_is_an_error_not_a_new_run(run):
    (run / "config.json").write_text("{ not json")
    for args in (["--resume", "auto", "--out", str(run)], ["--resume", str(run)]):
        result = CliRunner().invoke(train_cli, args)
        assert result.exit_code == 2
        assert "config.json" in error_line(result.output) and "damaged" in result.output
    (run / "config.json").unlink()
    before = sorted(p.name for p in (run / "unet").iterdir())
    for args in (["--resume", "auto", "--out", str(run)], ["--resume", str(run)],
                 ["--out", str(run)]):
        result = CliRunner().invoke(train_cli, args)
        assert result.exit_code == 2, args
        line = error_line(result.output)
        assert "config.json" in line or "already holds a run" in line
    assert sorted(p.name for p in (run / "unet").iterdir()) == before
    assert not (run / "config.json").exists()


def test_damaged_vae_of_a_run_is_an_error_and_deleting_it_re_exports_it(run):
    tensors, metadata = load_weights(run / "vae.safetensors")
    original = ({k: v.clone() for k, v in tensors.items()}, metadata)  # not a view of the file
    flip_byte(run / "vae.safetensors")
    args = ["--resume", "auto", "--out", str(run), "--steps", "5"]
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2 and "vae.safetensors" in error_line(result.output)
    (run / "vae.safetensors").unlink()  # the documented way out: stage 1's last checkpoint
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 0, result.output
    tensors, metadata = load_weights(run / "vae.safetensors")
    assert metadata["latent_scale"] == original[1]["latent_scale"]  # config: --steps 5 now
    assert [k for k in tensors if not torch.equal(tensors[k], original[0][k])] == []


# ----------------------------------------------------------------------------------------------
# A kill or power cut at any point of a checkpoint write
# ----------------------------------------------------------------------------------------------


def test_a_kill_right_after_the_rename_resumes_from_the_new_checkpoint(tmp_path, monkeypatch):
    """`latest` was written after the rename: a kill between the two left it on the previous
    checkpoint, and resume (and t2i-sample) took the older one although the new one was
    complete. `latest` now names the new checkpoint before its folder gets its name."""
    state = toy_state()
    save_checkpoint(tmp_path, state, {}, {}, keep_last=0)
    rename = os.rename

    def killed_after(src, dst):
        rename(src, dst)
        if str(dst).endswith("ckpt-0000005"):
            raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(ckpts.os, "rename", killed_after)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=0)
    assert ckpts.latest_checkpoint(tmp_path).name == "ckpt-0000005"
    assert ckpts.newest_intact(tmp_path)[0].name == "ckpt-0000005"


def test_a_kill_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    state = toy_state()
    first = save_checkpoint(tmp_path, state, {}, {}, keep_last=1)

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpts.os, "rename", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=1)
    assert ckpts.latest_checkpoint(tmp_path) == first and first.is_dir()


def test_the_new_checkpoint_reaches_the_disk_before_an_older_one_is_deleted(tmp_path,
                                                                          monkeypatch):
    """An OS crash or power cut keeps what was fsynced: every file of the new checkpoint, its
    folder and the stage folder (the rename) are flushed before prune deletes the previous
    checkpoint (keep_last=1 would otherwise risk leaving no intact one)."""
    from t2i.models import io

    events: list[str] = []
    fsync = io.os.fsync

    def recorded_fsync(fd: int) -> None:
        events.append("fsync " + os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(io.os, "fsync", recorded_fsync)
    discard = ckpts.discard
    monkeypatch.setattr(ckpts, "discard", lambda c: events.append("discard " + c.name)
                        or discard(c))
    state = toy_state()
    save_checkpoint(tmp_path, state, {}, {}, keep_last=1)
    events.clear()
    save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=1)
    deleted = events.index("discard ckpt-0000000")
    # files are flushed under their temporary names (.NAME.<random>.tmp in ckpt-N.tmp)
    synced = {re.sub(r"^\.(.+)\.\w+\.tmp$|^(.+)\.tmp$", lambda m: m[1] or m[2],
                     e.split(" ", 1)[1]) for e in events[:deleted] if e.startswith("fsync")}
    assert {"model.safetensors", "ema.safetensors", "trainer.pt", ckpts.MANIFEST,
            "ckpt-0000005", tmp_path.name} <= synced
    assert events[-1] == "discard ckpt-0000000"
