"""`t2i-train --init-from` (issue 16, section 2): a stage starts from another run's weights and
EMA, copied exactly, with a fresh optimizer at step 0 and its own config (here twice the
resolution); the parent is recorded in config.json; a tensor that does not fit is named; it is
not a resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2i.cli.train import main as train_cli
from t2i.config import config_from_json
from t2i.models.io import WeightsError, file_sha256
from t2i.train import distributed
from t2i.train.init_from import initialize_from_parent, with_parent
from t2i.train.run import Run
from t2i.train.stages import Env, build_diffusion_model, build_vae, step_settings
from t2i.train.state import init_train_state
from t2i.train.step import apply_update
from helpers import MICRO, assert_bitwise_equal, error_line, invoke, micro_cfg, toy_state


def sets(*extra: str) -> list[str]:
    """`--set` options for the MICRO config plus `extra`."""
    return [arg for item in (*MICRO, *extra) for arg in ("--set", item)]


def fresh_state(cfg, stage: str):
    model = (build_vae(cfg, torch.device("cpu")) if stage == "vae"
             else build_diffusion_model(cfg, torch.device("cpu")))
    return init_train_state(model, 1e-3, 0.0, cfg.train.seed, "fp32", torch.device("cpu"))


@pytest.mark.parametrize("stage", ["unet", "vae"])
def test_init_from_copies_weights_and_ema_exactly_with_a_fresh_optimizer(micro_run, stage):
    cfg = with_parent(micro_cfg(f"train.stage={stage}", "train.seed=5"), str(micro_run))
    parent = micro_run / stage / "ckpt-0000004"
    assert cfg.init_from.stage == stage and cfg.init_from.step == 4
    assert Path(cfg.init_from.checkpoint) == parent.resolve()
    assert cfg.init_from.sha256 == file_sha256(parent / "model.safetensors")
    assert cfg.init_from.ema_sha256 == file_sha256(parent / "ema.safetensors")
    state = initialize_from_parent(fresh_state(cfg, stage), cfg, stage)
    assert_bitwise_equal(state.model.state_dict(), load_file(str(parent / "model.safetensors")))
    ema = load_file(str(parent / "ema.safetensors"))
    assert state.ema.keys() and all(torch.equal(state.ema[k], ema[k]) for k in state.ema)
    assert not torch.equal(state.ema[next(iter(state.ema))],
                           state.model.state_dict()[next(iter(state.ema))])  # EMA != weights
    assert state.step == 0 and state.seed == 5
    assert len(state.optimizer.state) == 0  # no AdamW moments, no step counters


def test_a_child_continues_its_parents_ema_without_the_warm_up(micro_run):
    # The warm-up's decay at step 0 is 0.1: it would replace the copied EMA by the raw weights
    env = Env(torch.device("cpu"), distributed.World(), resume=False)
    child = with_parent(micro_cfg("train.stage=unet", "train.ema_decay=0.99"), str(micro_run))
    assert not step_settings(child, env, "unet", 1e-3, 10).ema_warmup
    assert step_settings(child, env, "vae", 1e-3, 10).ema_warmup  # the parent gave stage 2 only
    assert step_settings(micro_cfg("train.stage=unet"), env, "unet", 1e-3, 10).ema_warmup
    state = toy_state()
    state.ema["weight"].fill_(5.0)  # a parent's average, far from the raw weights
    settings = dataclasses.replace(step_settings(child, env, "unet", 0.0, 10), autocast_dtype=None)
    new_state, _ = apply_update(state, lambda x: state.model(x).squeeze(1), [(torch.ones(2, 3),)],
                                settings, contextlib.nullcontext)  # lr 0: the weights stay
    weight = new_state.model.weight.detach()
    torch.testing.assert_close(new_state.ema["weight"], 0.99 * 5.0 + 0.01 * weight)


def test_init_from_leaves_a_restored_state_and_other_stages_alone(micro_run):
    cfg = with_parent(micro_cfg("train.stage=unet"), str(micro_run))
    state = fresh_state(cfg, "unet")
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    assert initialize_from_parent(state, cfg, "vae") is state  # another stage: nothing read
    resumed = dataclasses.replace(state, step=3)  # restored from the run's own checkpoint
    initialize_from_parent(resumed, cfg, "unet")
    assert_bitwise_equal(state.model.state_dict(), before)  # nothing copied either time


def test_a_parent_changed_since_it_was_recorded_is_refused(micro_run_copy):
    cfg = with_parent(micro_cfg("train.stage=unet"), str(micro_run_copy))
    manifest = micro_run_copy / "unet" / "ckpt-0000004" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["files"]["model.safetensors"]["sha256"] = "0" * 64  # as if another checkpoint
    manifest.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match="changed since this run recorded it"):
        initialize_from_parent(fresh_state(cfg, "unet"), cfg, "unet")


def test_stage_2_at_twice_the_resolution_records_its_parent(micro_run, tmp_path):
    child = tmp_path / "child"
    result = invoke(train_cli, *sets("data.resolution=32"), "--stage", "unet", "--init-from",
                    micro_run, "--out", child, "--device", "cpu", "--log-every", 1)
    assert result.exit_code == 0, result.output
    config = json.loads((child / "config.json").read_text())
    assert config["data"]["resolution"] == 32
    parent = micro_run / "unet" / "ckpt-0000004"
    assert config["init_from"] == {
        "stage": "unet", "path": str(micro_run), "checkpoint": str(parent.resolve()), "step": 4,
        "sha256": file_sha256(parent / "model.safetensors"),
        "ema_sha256": file_sha256(parent / "ema.safetensors"), "kind": "checkpoint"}
    assert Run(child).read_config().init_from.step == 4  # config.json loads as a Config
    saved = config_from_json(load_metadata_config(child / "unet" / "ckpt-0000004"))
    assert saved.init_from.checkpoint == str(parent.resolve())
    # the parent's VAE came along; the child trained 4 fresh steps from step 0
    assert file_sha256(child / "vae.safetensors") == file_sha256(micro_run / "vae.safetensors")
    steps = [json.loads(x)["step"] for x in (child / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    # --resume keeps its meaning: --init-from is ignored, with a message
    again = invoke(train_cli, "--resume", child, "--init-from", micro_run, "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "--init-from" in again.output and "ignored" in again.output


def load_metadata_config(ckpt: Path) -> str:
    from t2i.models.io import read_metadata
    return read_metadata(ckpt / "model.safetensors")["config"]


@pytest.mark.parametrize("change, parent_value", [
    ("unet.base_channels=32", "16"),  # other shapes: a load would fail
    ("unet.norm_groups=8", "4"),  # the same shapes: before, it loaded and predicted 28% off
    ("unet.flip_sin_to_cos=false", "true"),
])
def test_an_architecture_change_is_named_before_any_work(micro_run, tmp_path, change,
                                                          parent_value):
    """--init-from needs the parent's architecture: a field that changes what the model
    computes is refused by name, whether or not it changes a tensor's shape."""
    child = tmp_path / "child"
    result = invoke(train_cli, *sets(change), "--stage", "unet", "--init-from", micro_run,
                    "--out", child, "--device", "cpu")
    assert result.exit_code == 2, result.output
    key, value = change.split("=")
    ckpt = micro_run / "unet" / "ckpt-0000004"
    assert error_line(result.output) == (
        f"Error: --init-from {ckpt}: the parent was trained with {key} {parent_value} (now "
        f"{value}); --init-from needs the parent's architecture: only data, schedule and "
        f"training settings may change")
    assert not child.exists()  # the failed first start left nothing


def test_a_tensor_that_does_not_fit_is_named_with_both_shapes(micro_run):
    """The last line of defence, for weights whose recorded config does not match them."""
    from t2i.models.checkpoints import read_checkpoint
    from t2i.train.init_from import copy_parent

    model = build_diffusion_model(micro_cfg("unet.base_channels=32"), torch.device("cpu"))
    state = init_train_state(model, 1e-3, 0.0, 0, "fp32", torch.device("cpu"))
    ckpt = micro_run / "unet" / "ckpt-0000004"
    parent = load_file(str(ckpt / "model.safetensors"))
    name, tensor = next((k, v) for k, v in model.state_dict().items()
                        if parent[k].shape != v.shape)
    with pytest.raises(WeightsError, match=re.escape(
            f"tensor {name} is {tuple(parent[name].shape)} in the parent, "
            f"{tuple(tensor.shape)} in this model")):
        copy_parent(state, read_checkpoint(ckpt), ckpt)


@pytest.mark.parametrize("args, message", [
    (["--stage", "all"], "name the stage it starts"),
    (["--stage", "unet", "--init-from-missing"], "no such run folder or checkpoint"),
    (["--stage", "unet", "--init-from-vae-ckpt"], "is a vae checkpoint"),
])
def test_bad_init_from_is_one_line(micro_run, tmp_path, args, message):
    target = {"--init-from-missing": tmp_path / "nope",
              "--init-from-vae-ckpt": micro_run / "vae" / "ckpt-0000004"}
    path = next((target[a] for a in args if a in target), micro_run)
    args = [a for a in args if a not in target]
    result = invoke(train_cli, *sets(), *args, "--init-from", path, "--out", tmp_path / "c",
                    "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in error_line(result.output)


def test_a_frozen_tower_against_a_trained_one_says_so(micro_run):
    """micro_run trains its text tower (MICRO: text.frozen=false); a child that freezes it
    holds no text tensors in its checkpoints (one copy per run), so the parent's are extra."""
    cfg = with_parent(micro_cfg("train.stage=unet"), str(micro_run))
    state = fresh_state(cfg, "unet")
    unet_only = dataclasses.replace(
        state, model=torch.nn.ModuleDict({"unet": state.model["unet"]}),
        ema={k: v for k, v in state.ema.items() if k.startswith("unet.")})
    with pytest.raises(WeightsError, match="set text.frozen as the parent had it"):
        initialize_from_parent(unet_only, cfg, "unet")
