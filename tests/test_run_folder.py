"""Run folders: one trainer at a time (a lock), no new run over an old one, resume of a named
checkpoint, a failed start or resume changes nothing, pruning by rename with clean-up of what a
kill leaves behind, and metrics.jsonl cut back to the checkpoint on resume."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from t2i.cli.train import main as train_cli
from t2i.cli.train_run import hold_run_folder, resolve_run
from t2i.cli.common import UserError
from t2i.models import checkpoints as ckpts
from t2i.train.checkpoint import save_checkpoint
from t2i.train.run import Run, RunFolderError, locked, newest_run
from helpers import error_line, micro_cfg, run_stage, toy_state


def unet_steps(run: Path) -> list[int]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r["stage"] == "unet"]


@pytest.fixture
def run(micro_run_copy) -> Path:
    """Both stages, unet checkpoints at steps 2 and 4 (a copy of conftest's micro_run)."""
    return micro_run_copy


# ----------------------------------------------------------------------------------------------
# The lock
# ----------------------------------------------------------------------------------------------


def test_second_trainer_on_a_locked_folder_gets_one_line_exit_2(tmp_path):
    out = tmp_path / "run"
    with locked(out):
        result = CliRunner().invoke(train_cli, ["--out", str(out), "--steps", "1"])
        assert result.exit_code == 2
        line = error_line(result.output)
        assert "in use by another trainer" in line and "pid" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # the holder's folder untouched
    with locked(out):  # released when the holder's block ends
        pass


def test_lock_is_held_by_rank_0_only(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with locked(out):
        monkeypatch.setenv("RANK", "1")
        with hold_run_folder(Run(out)):  # rank 1 takes no lock: no error
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(RunFolderError, match="in use"):
            with hold_run_folder(Run(out)):
                pass


# ----------------------------------------------------------------------------------------------
# New runs never replace old ones; failed starts leave nothing behind
# ----------------------------------------------------------------------------------------------


def test_new_run_in_a_folder_that_holds_one_is_refused(run):
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    result = CliRunner().invoke(train_cli, ["--out", str(run), "--steps", "1"])
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "already holds a run" in line and "--resume auto" in line and "--out" in line
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    vae_only = run.parent / "vae-only"
    (vae_only / "vae" / "ckpt-0000002").mkdir(parents=True)  # a checkpoint, even incomplete
    with pytest.raises(UserError, match="already holds a run"):
        resolve_run(None, str(vae_only), micro_cfg(), run.parent)


def test_failed_first_start_leaves_no_run_folder(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    out = tmp_path / "runs" / "new"
    result = CliRunner().invoke(train_cli, ["--stage", "unet", "--vae", str(junk),
                                            "--out", str(out)])
    assert result.exit_code == 2 and "junk.safetensors" in error_line(result.output)
    assert not out.exists()
    assert run_stage(micro_cfg("train.stage=unet"), out, vae=str(junk)) == 2  # launch() alone
    assert not (out / "config.json").exists() and newest_run(out.parent) is None


def test_failed_resume_changes_nothing(run):
    config = (run / "config.json").read_bytes()
    metrics = (run / "metrics.jsonl").read_bytes()
    (run / "unet" / "ckpt-0000007.tmp").mkdir()
    result = CliRunner().invoke(train_cli, ["--resume", "auto", "--out", str(run),
                                            "--batch-size", "2", "--steps", "6"])
    assert result.exit_code == 2
    assert "batch_size" in error_line(result.output)
    assert (run / "config.json").read_bytes() == config  # a plain --resume auto still works
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "unet" / "ckpt-0000007.tmp").is_dir()  # nothing touched before setup passed
    result = CliRunner().invoke(train_cli, ["--resume", "auto", "--out", str(run),
                                            "--steps", "5", "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "config.json").read_text())["train"]["unet_steps"] == 5
    assert not (run / "unet" / "ckpt-0000007.tmp").exists()  # leftovers cleaned at start


# ----------------------------------------------------------------------------------------------
# Resume of a named checkpoint; metrics cut back
# ----------------------------------------------------------------------------------------------


def test_resume_of_a_named_checkpoint_starts_exactly_there(run):
    named = run / "unet" / "ckpt-0000002"
    assert resolve_run(str(named), None, micro_cfg(), run.parent) == (Run(run), True, named)
    result = CliRunner().invoke(train_cli, ["--resume", str(named), "--steps", "3",
                                            "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert "from ckpt-0000002" in result.output
    # from ckpt-4 (the latest) nothing would have trained: step 4 is past --steps 3
    assert [p.name for p in ckpts.complete_checkpoints(run / "unet")] == ["ckpt-0000002",
                                                                          "ckpt-0000003"]
    assert ckpts.latest_checkpoint(run / "unet").name == "ckpt-0000003"
    assert unet_steps(run) == [1, 2, 3]


def test_resume_auto_cuts_metrics_back_to_the_checkpoint(run):
    shutil.rmtree(run / "unet" / "ckpt-0000004")  # as if killed after the step-4 log line
    (run / "unet" / "latest").write_text("ckpt-0000002\n")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"stage": "unet", "step": 5, "lo')  # a line cut short by the kill
    assert unet_steps_raw(run) == [1, 2, 3, 4]
    result = CliRunner().invoke(train_cli, ["--resume", "auto", "--out", str(run),
                                            "--log-every", "1"])
    assert result.exit_code == 0, result.output
    assert unet_steps(run) == [1, 2, 3, 4]  # 3 and 4 once each, no cut line


def unet_steps_raw(run: Path) -> list[int]:
    steps = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        steps += [record["step"]] if record["stage"] == "unet" else []
    return steps


def test_cut_metrics_keeps_other_stages_and_drops_cut_lines(tmp_path):
    run = Run(tmp_path)
    lines = [json.dumps({"stage": s, "step": i}) for s in ("vae", "unet") for i in (1, 2, 3)]
    run.metrics_path.write_text("\n".join(lines) + '\n{"stage": "unet", "st')
    assert run.cut_metrics("unet", 1) == 3
    kept = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in kept] == [("vae", 1), ("vae", 2), ("vae", 3),
                                                        ("unet", 1)]


# ----------------------------------------------------------------------------------------------
# Pruning and leftovers
# ----------------------------------------------------------------------------------------------


def test_prune_renames_before_deleting(tmp_path, monkeypatch):
    state = toy_state()
    first = save_checkpoint(tmp_path, state, {}, {}, keep_last=1)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        if Path(path).name == ".trash-ckpt-0000000" and Path(path).exists():
            raise KeyboardInterrupt  # the process dies while deleting the old checkpoint
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpts.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, dataclasses.replace(state, step=1), {}, {}, keep_last=1)
    monkeypatch.undo()
    assert not first.exists() and (tmp_path / ".trash-ckpt-0000000").is_dir()
    assert [p.name for p in ckpts.complete_checkpoints(tmp_path)] == ["ckpt-0000001"]


def test_clean_leftovers_removes_tmp_trash_and_incomplete(tmp_path):
    keep = save_checkpoint(tmp_path, toy_state(), {}, {}, keep_last=0)
    (tmp_path / "ckpt-0000009.tmp").mkdir()
    (tmp_path / ".trash-ckpt-0000001").mkdir()
    (tmp_path / "latest.tmp").write_text("x")
    (tmp_path / ".model.safetensors.abc.tmp").write_text("x")
    (tmp_path / "ckpt-0000003").mkdir()  # a checkpoint without its files (old non-atomic prune)
    (tmp_path / "ckpt-0000003" / "trainer.pt").write_text("x")
    assert ckpts.clean_leftovers(tmp_path) == sorted(
        [".model.safetensors.abc.tmp", ".trash-ckpt-0000001", "ckpt-0000003",
         "ckpt-0000009.tmp", "latest.tmp"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [keep.name, "latest"]
