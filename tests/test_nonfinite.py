"""Non-finite values: the consecutive non-finite count survives a resume, the stop comes at
exactly the step where it reaches train.max_nonfinite (not at the next log interval) with
reads only at checks, and non-finite weights are never written (checkpoints, vae.safetensors)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from t2i.train import distributed, loop
from t2i.train.checkpoint import latest_checkpoint, load_checkpoint
from t2i.train.loop import LoopCounters, LoopSettings, TrainingError, fit
from t2i.train.run import Run
from t2i.train.state import init_train_state, nonfinite_weights
from t2i.train.step import apply_update
from helpers import micro_cfg, run_stage, toy_settings, toy_state


def toy_step(nan_steps: set[int], lr: float = 0.1):
    """A real apply_update on a linear model whose loss is NaN on the 1-based steps given."""
    settings = toy_settings(base_lr=lr, total_steps=100)

    def step(state, batch):
        scale = float("nan") if state.step + 1 in nan_steps else 1.0
        objective = lambda x: (state.model(x) * scale).squeeze(1) ** 2  # noqa: E731
        return apply_update(state, objective, [(batch,)], settings, contextlib.nullcontext)

    return step


def toy_fit(state, tmp_path: Path, nan_steps: set[int], total: int, log_every: int = 25,
            max_nonfinite: int = 3, save_every: int = 0, counters=LoopCounters(), lr=0.1):
    settings = LoopSettings(stage="toy", total_steps=total, global_batch=2, log_every=log_every,
                            sample_every=0, save_every=save_every, keep_last=0,
                            max_nonfinite=max_nonfinite, show_progress=False)
    batches = iter(lambda: torch.ones(2, 3), None)
    return fit(state, toy_step(nan_steps, lr), batches, settings, Run(tmp_path),
               distributed.World(), checkpoint_extra=dict, checkpoint_metadata={},
               lr_of=lambda s: lr, counters=counters)


def logged_steps(tmp_path: Path) -> list[int]:
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


@pytest.mark.parametrize("nan_steps, stop_step", [
    (set(range(1, 100)), 3),             # from the start: the third step
    (set(range(5, 100)), 7),             # a read every 3 steps would see it only at step 9
    ({1, 2, 4, 5, 6, 7}, 6),             # a finite step resets the count
])
def test_stop_comes_at_the_step_the_count_reaches_the_limit(tmp_path, nan_steps, stop_step):
    with pytest.raises(TrainingError, match=f"non-finite for 3 steps in a row \\(up to step "
                                            f"{stop_step},"):
        toy_fit(toy_state(), tmp_path, nan_steps, total=50, log_every=25)
    assert logged_steps(tmp_path) == [stop_step]  # the interval is logged before stopping


def test_reads_happen_at_checks_not_every_step(tmp_path, monkeypatch):
    """Healthy: one read per min(log_every, max_nonfinite) window, never one per step."""
    polled = []
    real = loop.poll

    def counting(world, in_row, request):
        polled.append(True)
        return real(world, in_row, request)

    monkeypatch.setattr(loop, "poll", counting)
    toy_fit(toy_state(), tmp_path, set(), total=50, log_every=25, max_nonfinite=10)
    assert len(polled) == 6  # steps 10, 20, 25, 30, 40, 50 (log steps and count checks)


def test_nonfinite_count_survives_resume(tmp_path):
    first = toy_fit(toy_state(), tmp_path, set(range(1, 100)), total=2, max_nonfinite=3)
    ckpt = latest_checkpoint(tmp_path / "toy")
    assert ckpt.name == "ckpt-0000002"
    state, extra = load_checkpoint(ckpt, toy_state())
    counters = LoopCounters.from_extra(extra)
    assert counters == LoopCounters(nonfinite_in_row=2, skipped_total=2)
    assert first.step == state.step == 2
    # two more non-finite steps would be fine without the restored count; with it, one stops
    with pytest.raises(TrainingError, match="non-finite for 3 steps in a row \\(up to step 3,"):
        toy_fit(state, tmp_path, set(range(1, 100)), total=10, counters=counters)


def test_stage_restore_returns_the_saved_counters(tmp_path):
    from t2i.train.stages import Env, restore
    toy_fit(toy_state(), tmp_path, {2}, total=2, max_nonfinite=3)
    env = Env(device=torch.device("cpu"), world=distributed.World(), resume=True)
    state, _, counters = restore(toy_state(), Run(tmp_path), "toy", env)
    assert state.step == 2 and counters == LoopCounters(nonfinite_in_row=1, skipped_total=1)


def test_nonfinite_weights_are_never_saved(tmp_path):
    """An infinite learning rate: finite gradients, NaN weights after the first update."""
    with pytest.raises(TrainingError, match="weights became non-finite by step 1.*nothing was"):
        toy_fit(toy_state(), tmp_path, set(), total=5, save_every=1, lr=float("inf"))
    assert latest_checkpoint(tmp_path / "toy") is None
    assert not list(tmp_path.glob("toy/ckpt-*"))


def test_nonfinite_weights_lists_model_and_ema_tensors():
    state = toy_state()
    assert nonfinite_weights(state) == []
    with torch.no_grad():
        state.model.bias.fill_(float("inf"))
        state.ema["weight"][0, 0] = float("nan")
    assert nonfinite_weights(state) == ["bias", "ema.weight"]


@pytest.mark.parametrize("poison", ["weight", "latent_scale"])
def test_export_refuses_a_nonfinite_vae(tmp_path, monkeypatch, poison):
    from t2i.train import stages, vae_stage
    cfg = micro_cfg("train.stage=vae")
    env = stages.Env(device=torch.device("cpu"), world=distributed.World(), resume=False)
    state = init_train_state(stages.build_vae(cfg, env.device), 1e-3, 0.0, 0, "fp32", env.device)
    if poison == "weight":
        with torch.no_grad():
            next(iter(state.ema.values())).fill_(float("nan"))
    else:
        monkeypatch.setattr(vae_stage, "measure_latent_scale", lambda *a, **k: float("nan"))
    run = Run(tmp_path)
    with pytest.raises(TrainingError, match="vae.safetensors' was not written"):
        stages.export_vae(cfg, state, run, env)
    assert not run.vae_weights.exists()
    assert not list(tmp_path.glob("*.tmp"))


def test_a_diverging_vae_run_exits_1_and_writes_no_weights(tmp_path, capsys):
    """A huge (finite) learning rate: Adam's first updates overflow the weights."""
    out = tmp_path / "run"
    assert run_stage(micro_cfg("train.stage=vae", "train.vae_lr=1e38"), out) == 1
    assert "weights became non-finite" in capsys.readouterr().err
    assert not (out / "vae.safetensors").exists() and not list(out.glob("vae/ckpt-*"))


def test_samples_per_s_counts_training_steps_alone(tmp_path, monkeypatch):
    """A fake clock: the first step takes 100 s (a compile), every other step 1 s, each grid
    50 s. samples_per_s is 2 samples/s in both intervals, as if no grid ran and
    nothing compiled; the first record carries first_step_s = 100 (the old rates: 8 samples
    in 153 s, 8 in 104 s)."""
    now = [0.0]
    monkeypatch.setattr(loop, "CLOCK", lambda: now[0])
    step = toy_step(set())

    def timed_step(state, batch):
        now[0] += 100.0 if state.step == 0 else 1.0
        return step(state, batch)

    def grid(state):
        now[0] += 50.0

    settings = LoopSettings(stage="toy", total_steps=8, global_batch=2, log_every=4,
                            sample_every=2, save_every=0, keep_last=0, max_nonfinite=3,
                            show_progress=False)
    fit(toy_state(), timed_step, iter(lambda: torch.ones(2, 3), None), settings, Run(tmp_path),
        distributed.World(), checkpoint_extra=dict, checkpoint_metadata={}, lr_of=lambda s: 0.1,
        on_sample=grid)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert [r["samples_per_s"] for r in records] == [2.0, 2.0]
    assert records[0]["first_step_s"] == 100.0 and "first_step_s" not in records[1]


def test_interval_rate_keeps_a_lone_first_step():
    """With log_every 1 the first interval is the first step alone: its rate is that step's."""
    assert loop.interval_rate(1, 4, 8.0, 0.0, first_step_s=8.0) == 0.5
    assert loop.interval_rate(3, 4, 10.0, 2.0, first_step_s=6.0) == 4.0  # 2 steps x 4 in 2 s
