"""`t2i-train --stage unet --init-from PARENT` with a frozen text tower (t2i/train/init_tower.py):
a child that names no tower takes its parent's stored one (RUN/text.safetensors, no original
file needed); one naming another tower is refused in one line naming both; the same weights
given explicitly are accepted. With no text option at all a child's text section is its
parent's, text.frozen included, whatever its preset says (a `tiny` child of a frozen-tower
parent, a `small` child of a parent that trained its tower); an explicit text.frozen against the
parent's is refused saying which way. And t2i-train prints its `run:` line only once a stage
really started (t2i/cli/launch.py, env.commit_start)."""

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
from t2i.config import apply_overrides, get_preset
from t2i.models.checkpoints import read_checkpoint
from t2i.train.init_from import initialize_from_parent, with_parent
from t2i.train.stages import build_diffusion_model
from t2i.train.state import init_train_state
from helpers import (MICRO, assert_bitwise_equal, error_line, invoke, micro_cfg, run_stage,
                     save_random_vae)

# The child: MICRO (whose text.frozen=false comes after any option) with a frozen tower, two
# UNet steps at twice the parent's resolution.
CHILD = [*MICRO, "text.frozen=true", "data.resolution=32", "train.unet_steps=2",
         "train.save_every=2"]
# A child with no text option at all: MICRO's other keys, but unet.context_dim (the preset's
# must equal its text.width; the parent's comes with its text section).
NO_TEXT = [item for item in CHILD if not item.startswith(("text.", "unet.context_dim="))]
# The `small` preset (text.frozen=true, open_clip ViT-B-32) shaped as MICRO, text aside.
SMALL_AS_MICRO = ["data.source=shapes", "data.workers=0", "vae.num_res_blocks=1",
                  "unet.num_res_blocks=1", "unet.coord_channels=true",
                  "unet.attention_positions=true", *NO_TEXT]


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


def train_child(parent_run: Path, out: Path, *args, child=CHILD):
    sets = [arg for item in child for arg in ("--set", item)]
    return invoke(train_cli, *sets, "--stage", "unet", "--init-from", parent_run, *args,
                  "--out", out, "--device", "cpu", "--log-every", 1)


def run_text(run: Path) -> dict:
    return json.loads((run / "config.json").read_text())["text"]


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


def test_a_tiny_child_naming_the_parents_tower_freezes_it_as_the_parent(parent, tmp_path):
    """A source given without --text-frozen: text.frozen is the parent's, not the preset's."""
    run, a, _, _ = parent
    result = train_child(run, tmp_path / "child", "--text-encoder", a, child=NO_TEXT)
    assert result.exit_code == 0, result.output
    assert same_tower(tmp_path / "child", run).weights == str(a)
    assert run_text(tmp_path / "child")["frozen"] is True


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


def test_a_child_setting_another_context_dim_is_refused(parent, tmp_path):
    """With no text option the parent's text.width comes with its section, and with it
    unet.context_dim; an explicit other one is one line, no run folder."""
    result = train_child(parent[0], tmp_path / "child", "--set", "unet.context_dim=64",
                         child=NO_TEXT)
    assert result.exit_code == 2, result.output
    assert "unet.context_dim=64 (--set) must equal it" in error_line(result.output)
    assert not (tmp_path / "child").exists()


def test_a_tiny_child_with_no_text_option_takes_the_parents_frozen_tower(parent, tmp_path):
    """The `tiny` preset trains its tower (text.frozen=false); with no text option the child
    takes the parent's text section, frozen, and trains on the parent's stored tower."""
    run = parent[0]
    assert get_preset("tiny").text.frozen is False
    result = train_child(run, tmp_path / "child", child=NO_TEXT)
    assert result.exit_code == 0, result.output
    child = tmp_path / "child"
    assert same_tower(child, run) == stored_tower(run)[1]  # bitwise the parent's stored tower
    assert run_text(child) == run_text(run)  # the parent's whole text section, frozen included
    assert not any(name.startswith("text.") for name in load_weights(
        child / "unet" / "ckpt-0000002" / "model.safetensors")[0])  # frozen: stored once


@pytest.mark.parametrize("given, option", [
    (["--text-trainable"], "--text-trainable"),
    (["--set", "text.frozen=false"], "--set text.frozen=false"),
])
def test_a_trainable_child_of_a_frozen_parent_is_refused_saying_which_way(parent, tmp_path,
                                                                         given, option):
    run = parent[0]
    result = train_child(run, tmp_path / "child", *given, child=NO_TEXT)
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert f"the parent froze its text tower ({run / TOWER_FILE}) and this run trains it" in line
    assert option in line and "drop that option" in line
    assert run_lines(result.stdout) == [] and not (tmp_path / "child").exists()


def test_stage_2_itself_refuses_training_a_frozen_parents_tower_saying_which_way(
        parent, tmp_path, capsys):
    """A config given to the trainer directly (no command-line check): refused where the
    weights are copied (init_from.copy_parent), naming the way and the option to drop."""
    run, _, _, vae = parent
    cfg = with_parent(micro_cfg(*CHILD[len(MICRO):], "train.stage=unet"), str(run))
    trains = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, frozen=False))
    assert run_stage(trains, tmp_path / "child", vae=str(vae)) == 2
    line = error_line(capsys.readouterr().err)
    assert f"the parent froze its text tower ({run / TOWER_FILE}) and this run trains it" in line
    assert "--text-trainable" in line and not (tmp_path / "child").exists()


def test_a_frozen_child_of_a_trained_parent_is_refused_saying_which_way(micro_run, tmp_path):
    """micro_run trains its tower (MICRO: text.frozen=false)."""
    result = train_child(micro_run, tmp_path / "child", "--text-frozen", child=NO_TEXT)
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert "the parent trained its text tower" in line and "this run freezes it" in line
    assert "--text-frozen" in line and "drop that option" in line
    assert run_lines(result.stdout) == [] and not (tmp_path / "child").exists()


def test_a_small_child_with_no_text_option_trains_the_parents_trained_tower(micro_run,
                                                                            tmp_path):
    """The `small` preset freezes a pretrained ViT-B-32 (nothing here to download it); with no
    text option the child's text section is its parent's, trainable, and the tower's weights
    and EMA start as the parent checkpoint's, bit for bit."""
    assert get_preset("small").text.frozen is True
    result = train_child(micro_run, tmp_path / "child", "--preset", "small",
                         child=SMALL_AS_MICRO)
    assert result.exit_code == 0, result.output
    assert run_text(tmp_path / "child") == run_text(micro_run)
    assert run_text(micro_run)["frozen"] is False
    cfg = with_parent(apply_overrides(get_preset("small"), [*SMALL_AS_MICRO, "train.stage=unet"]),
                      str(micro_run), SMALL_AS_MICRO)
    model = build_diffusion_model(cfg, torch.device("cpu"))
    state = initialize_from_parent(
        init_train_state(model, 1e-3, 0.0, cfg.train.seed, "fp32", torch.device("cpu")), cfg,
        "unet")
    parent = read_checkpoint(micro_run / "unet" / "ckpt-0000004")
    text = {k: v for k, v in state.model.state_dict().items() if k.startswith("text.")}
    assert text  # a trained tower: its tensors are in the model, copied from the parent
    assert_bitwise_equal(text, {k: v for k, v in parent.model.items() if k in text})
    assert all(torch.equal(state.ema[k], parent.ema[k]) for k in state.ema
               if k.startswith("text."))


def test_a_refused_vae_prints_no_run_line(parent, tmp_path):
    """A stage that fails to start (here --vae names a text tower, no VAE) prints its Error
    and no `run:` line: no run was made."""
    run, a, _, _ = parent
    result = train_child(run, tmp_path / "child", "--vae", a)
    assert result.exit_code == 2, result.output
    assert error_line(result.output)
    assert run_lines(result.stdout) == [] and not (tmp_path / "child").exists()


@pytest.fixture(scope="module")
def trained_parent(tmp_path_factory):
    """A stage-2 run that trains its text tower, started from the file `a`; returns (run
    folder, a, the VAE file)."""
    root = tmp_path_factory.mktemp("trained-parent")
    a = tower_file(root / "a.safetensors", 3)
    vae = save_random_vae(micro_cfg(), root / "vae.safetensors")
    cfg = micro_cfg("train.stage=unet", f"text.weights={a}", "train.unet_steps=2",
                    "train.save_every=2")
    assert not cfg.text.frozen
    assert run_stage(cfg, root / "run", vae=str(vae)) == 0
    return root / "run", a, vae


def test_a_trained_tower_needs_no_source_once_a_checkpoint_brings_it(trained_parent, tmp_path):
    """A child of a parent that trained its tower, and a resume of such a run, build the tower
    without its text.weights file (the checkpoint's text.* follow): with the file moved away
    they run, bitwise as with it."""
    run, a, vae = trained_parent
    child_sets = [arg for item in NO_TEXT for arg in ("--set", item)]
    moved = tmp_path / "a-moved.safetensors"

    def child(out: Path, *extra):
        return invoke(train_cli, *child_sets, "--stage", "unet", "--init-from", run,
                      "--vae", vae, "--out", out, "--device", "cpu", *extra)

    with_file = child(tmp_path / "with")
    assert with_file.exit_code == 0, with_file.output
    resumed_copy = Path(shutil.copytree(run, tmp_path / "resumed"))
    a.rename(moved)
    try:
        without = child(tmp_path / "without")
        resumed = invoke(train_cli, "--resume", resumed_copy, "--steps", 4, "--device", "cpu")
    finally:
        moved.rename(a)
    assert without.exit_code == 0, without.output
    assert resumed.exit_code == 0, resumed.output
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(
            load_weights(tmp_path / "with" / "unet" / "ckpt-0000002" / name)[0],
            load_weights(tmp_path / "without" / "unet" / "ckpt-0000002" / name)[0])
    assert json.loads((tmp_path / "without" / "config.json").read_text())["text"]["frozen"] is False
