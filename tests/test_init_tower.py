"""`t2i-train --stage unet --init-from PARENT` with a frozen text tower (t2i/train/init_tower.py):
a child that names no tower takes its parent's stored one (RUN/text.safetensors, no original
file needed); one naming another tower is refused in one line naming both; the same weights
given explicitly are accepted. And t2i-train prints its `run:` line only once a stage really
started (t2i/cli/launch.py, env.commit_start)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from t2i.cli.train import main as train_cli
from t2i.models.checkpoints import read_weights
from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference
from t2i.models.io import load_weights, save_weights
from t2i.models.text import build_text_encoder
from t2i.train.init_from import with_parent
from helpers import MICRO, error_line, invoke, micro_cfg, run_stage, save_random_vae

# The child: MICRO (whose text.frozen=false comes after any option) with a frozen tower, two
# UNet steps at twice the parent's resolution.
CHILD = [*MICRO, "text.frozen=true", "data.resolution=32", "train.unet_steps=2",
         "train.save_every=2"]


def tower_file(path: Path, seed: int) -> Path:
    """A random MICRO-shaped text tower (width 32, 1 block) saved as a local weights file."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        save_weights(path, build_text_encoder(micro_cfg().text).state_dict())
    return path


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A stage-2 run (2 UNet steps on a random VAE) with a frozen tower from the file `a`;
    returns (run folder, a, b: another tower's file, the VAE file)."""
    root = tmp_path_factory.mktemp("tower-parent")
    a, b = tower_file(root / "a.safetensors", 3), tower_file(root / "b.safetensors", 4)
    vae = save_random_vae(micro_cfg(), root / "vae.safetensors")
    cfg = micro_cfg("train.stage=unet", "text.frozen=true", f"text.weights={a}",
                    "train.unet_steps=2", "train.save_every=2")
    assert run_stage(cfg, root / "run", vae=str(vae)) == 0
    return root / "run", a, b, vae


def train_child(parent_run: Path, out: Path, *args):
    sets = [arg for item in CHILD for arg in ("--set", item)]
    return invoke(train_cli, *sets, "--stage", "unet", "--init-from", parent_run, *args,
                  "--out", out, "--device", "cpu", "--log-every", 1)


def stored_tower(run: Path) -> tuple[dict, TowerReference]:
    tensors, metadata = load_weights(run / TOWER_FILE)
    return tensors, TowerReference.from_json(metadata[METADATA_KEY], run / TOWER_FILE)


def same_tower(child: Path, parent_run: Path) -> TowerReference:
    """The child's reference, once checked that the child stores the parent's tower bitwise
    (sha256 too) and that its checkpoint names it."""
    ours, reference = stored_tower(child)
    theirs, parent_reference = stored_tower(parent_run)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert reference.sha256 == parent_reference.sha256
    _, metadata = read_weights(child / "unet" / "ckpt-0000002", "model.safetensors")
    assert TowerReference.from_json(metadata[METADATA_KEY], child) == reference
    return reference


def run_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(("run:", "resuming:"))]


def test_a_child_naming_no_tower_takes_the_parents_stored_copy(parent, tmp_path):
    run, a, _, _ = parent
    moved = tmp_path / "a-moved.safetensors"
    a.rename(moved)  # the original file is not needed: the parent's copy is taken
    try:
        result = train_child(run, tmp_path / "child")
    finally:
        moved.rename(a)
    assert result.exit_code == 0, result.output
    child = tmp_path / "child"
    assert same_tower(child, run) == stored_tower(run)[1]  # the parent's reference, as it was
    text = json.loads((child / "config.json").read_text())["text"]
    assert (text["weights"], text["frozen"]) == (str(a), True)  # the parent's source, recorded
    [line] = run_lines(result.stdout)
    assert line.startswith(f"run: {child}  (preset")  # a good start says so, once


@pytest.mark.parametrize("how", ["--text-encoder", "--set"])
def test_a_child_naming_another_tower_is_refused_naming_both(parent, tmp_path, how):
    run, a, b, _ = parent
    given = ["--text-encoder", b] if how == "--text-encoder" else ["--set", f"text.weights={b}"]
    result = train_child(run, tmp_path / "child", *given)
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert str(run / TOWER_FILE) in line and str(a) in line and str(b) in line
    assert line.count("sha256") == 2 and "leave out --text-encoder" in line
    assert not (tmp_path / "child").exists()  # nothing written
    assert run_lines(result.stdout) == []


def test_a_tower_file_changed_since_the_parent_used_it_is_refused(parent, tmp_path):
    """The parent's own text.weights path, but other weights in it now: compared by sha256,
    not by name."""
    run, a, b, _ = parent
    kept = Path(shutil.copyfile(a, tmp_path / "a-kept.safetensors"))
    shutil.copyfile(b, a)
    try:
        result = train_child(run, tmp_path / "child", "--text-encoder", a)
    finally:
        shutil.copyfile(kept, a)
    assert result.exit_code == 2, result.output
    assert "is not this run's" in error_line(result.output)
    assert not (tmp_path / "child").exists()


@pytest.mark.parametrize("where", ["same path", "a copy elsewhere"])
def test_the_parents_tower_given_explicitly_is_accepted(parent, tmp_path, where):
    run, a, _, _ = parent
    given = a if where == "same path" else Path(shutil.copyfile(a, tmp_path / "copy.safetensors"))
    result = train_child(run, tmp_path / "child", "--text-encoder", given)
    assert result.exit_code == 0, result.output
    assert same_tower(tmp_path / "child", run).weights == str(given)  # the source given


def test_stage_2_itself_refuses_another_tower_than_the_parents(parent, tmp_path, capsys):
    """Past the command's check too (a config given to the trainer directly): one Error line,
    no `run:` line, no run folder."""
    run, a, b, vae = parent
    cfg = with_parent(micro_cfg(*CHILD[len(MICRO):], "train.stage=unet", f"text.weights={a}"),
                      str(run), [f"text.weights={a}"])
    other = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, weights=str(b)))
    assert run_stage(other, tmp_path / "child", vae=str(vae)) == 2
    out, err = capsys.readouterr()
    assert "is not this run's" in error_line(err) and str(b) in error_line(err)
    assert run_lines(out) == [] and not (tmp_path / "child").exists()


def test_a_child_setting_another_tower_shape_is_refused(parent, tmp_path):
    result = train_child(parent[0], tmp_path / "child", "--set", "text.layers=0")
    assert result.exit_code == 2, result.output
    assert "text.layers=0 (--set) disagrees with the parent's frozen text tower" in \
        error_line(result.output)
    assert not (tmp_path / "child").exists()


def test_a_trainable_child_of_a_frozen_parent_is_still_refused(parent, tmp_path):
    run = parent[0]
    result = train_child(run, tmp_path / "child", "--set", "text.frozen=false")
    assert result.exit_code == 2, result.output
    assert "set text.frozen as the parent had it" in error_line(result.output)
    assert run_lines(result.stdout) == [] and not (tmp_path / "child").exists()


def test_a_refused_vae_prints_no_run_line(parent, tmp_path):
    """A stage that fails to start (here --vae names a text tower, no VAE) prints its Error
    and no `run:` line: no run was made."""
    run, a, _, _ = parent
    result = train_child(run, tmp_path / "child", "--vae", a)
    assert result.exit_code == 2, result.output
    assert error_line(result.output)
    assert run_lines(result.stdout) == [] and not (tmp_path / "child").exists()
