"""Training: resume equivalence, gradient accumulation, non-finite skipping, atomic checkpoints,
CLI errors. All on micro configs so the whole file runs in well under a minute on 2 cores."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from t2i.cli.train import main as train_cli
from t2i.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from t2i.train.loop import LoopSettings, TrainingError, fit
from t2i.train.run import Run
from t2i.train.step import apply_update
from t2i.train import distributed
from helpers import assert_bitwise_equal, micro_cfg, run_stage, toy_settings, toy_state


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_vae_stage_writes_checkpoints_scale_and_metrics(micro_run):
    assert (micro_run / "vae.safetensors").is_file()
    assert latest_checkpoint(micro_run / "vae").name == "ckpt-0000004"
    scale = weights(micro_run / "vae.safetensors")["latent_scale"]
    assert scale.item() != 1.0 and torch.isfinite(scale)  # measured, not the default
    records = [json.loads(x) for x in (micro_run / "metrics.jsonl").read_text().splitlines()]
    vae_records = [r for r in records if r["stage"] == "vae"]  # then the UNet stage's 4
    assert len(vae_records) == 4 and "loss" in vae_records[0]


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_resume_is_bitwise_equal_to_uninterrupted(stage, micro_run, tmp_path):
    cfg = micro_cfg(f"train.stage={stage}")
    vae = None if stage == "vae" else str(micro_run / "vae.safetensors")
    straight = tmp_path / "straight"
    assert run_stage(cfg, straight, vae=vae) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / stage / "ckpt-0000004")  # as if killed right after step 2's save
    (resumed / stage / "latest").write_text("ckpt-0000002\n")
    (resumed / "vae.safetensors").unlink(missing_ok=True)
    assert run_stage(cfg, resumed, resume=True, vae=vae) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(weights(straight / stage / "ckpt-0000004" / name),
                             weights(resumed / stage / "ckpt-0000004" / name))


def test_grad_accumulation_equals_big_batch(micro_run, tmp_path):
    results = []
    for accum in (1, 2):  # same global batch of 4: one pass, or two micro-batches of 2
        cfg = micro_cfg("train.stage=unet", "train.unet_steps=3", f"train.grad_accum={accum}")
        assert run_stage(cfg, tmp_path / f"accum{accum}", vae=str(micro_run / "vae.safetensors")) == 0
        results.append(weights(tmp_path / f"accum{accum}" / "unet" / "ckpt-0000003" / "model.safetensors"))
    for k in results[0]:  # three Adam steps amplify summation-order rounding a little
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-4)
    from t2i.train.stages import build_diffusion_model
    init = build_diffusion_model(micro_cfg(), torch.device("cpu")).state_dict()
    moved = [k for k in init if not torch.equal(init[k], results[0][k])]
    assert len(moved) > len(init) // 2  # the step really updated the weights


def test_run_trained_with_external_vae_keeps_a_copy_and_samples(micro_run, tmp_path, capsys):
    from t2i.sample import generate, load_pipeline
    source = micro_run / "vae.safetensors"
    cfg = micro_cfg("train.stage=unet", "train.unet_steps=1")
    assert run_stage(cfg, tmp_path / "run", vae=str(source)) == 0
    assert (tmp_path / "run" / "vae.safetensors").read_bytes() == source.read_bytes()
    images = generate(load_pipeline(tmp_path / "run"), ["a red circle"], steps=2).images
    assert images[0].size == (16, 16)
    other = tmp_path / "other.safetensors"
    from t2i.models.io import load_weights, save_weights
    tensors, metadata = load_weights(source)  # same config, other weights
    save_weights(other, {**tensors, "latent_scale": tensors["latent_scale"] * 2}, metadata)
    assert run_stage(cfg, tmp_path / "run", vae=str(other)) == 2
    assert "holds another VAE" in capsys.readouterr().err


def test_accumulated_gradient_equals_big_batch_gradient():
    """With plain SGD (lr 1) the update is -grad, so the accumulated gradient is checked
    against autograd on the whole batch."""
    import copy
    import dataclasses
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    reference(x).squeeze(1).pow(2).mean().backward()
    expected = {k: p.grad.clone() for k, p in reference.named_parameters()}
    for accum in (1, 2, 4):
        model = copy.deepcopy(reference)
        state = dataclasses.replace(toy_state(), model=model,
                                    optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
                                    ema={k: v.detach().clone() for k, v in model.named_parameters()})
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        objective = lambda inp, m=model: m(inp).squeeze(1) ** 2  # noqa: E731
        settings = toy_settings(base_lr=1.0, grad_clip=1e9, grad_accum=accum)
        apply_update(state, objective, [(c,) for c in x.chunk(accum)], settings, contextlib.nullcontext)
        for k, p in model.named_parameters():
            torch.testing.assert_close(before[k] - p.detach(), expected[k], rtol=1e-5, atol=1e-7)


def test_nonfinite_loss_never_reaches_the_weights(tmp_path):
    state = toy_state()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    x = torch.ones(2, 3)
    nan_objective = lambda inp: (state.model(inp) * float("nan")).squeeze(1)  # noqa: E731
    state2, metrics = apply_update(state, nan_objective, [(x,)], toy_settings(), contextlib.nullcontext)
    assert int(metrics["skipped"]) == 1 and state2.step == 1
    assert_bitwise_equal(before, state2.model.state_dict())
    ok_objective = lambda inp: state.model(inp).squeeze(1)  # noqa: E731
    state3, metrics = apply_update(state2, ok_objective, [(x,)], toy_settings(), contextlib.nullcontext)
    assert int(metrics["skipped"]) == 0
    assert not torch.equal(before["weight"], state3.model.state_dict()["weight"])


def test_too_many_nonfinite_steps_stop_with_a_message(tmp_path):
    state = toy_state()
    objective = lambda inp: (state.model(inp) * float("nan")).squeeze(1)  # noqa: E731

    def step(st, batch):
        return apply_update(st, objective, [(batch,)], toy_settings(), contextlib.nullcontext)

    settings = LoopSettings(stage="toy", total_steps=50, global_batch=2, log_every=1,
                            sample_every=0, save_every=0, keep_last=1, max_nonfinite=3,
                            show_progress=False)
    batches = iter(lambda: torch.ones(2, 3), None)
    with pytest.raises(TrainingError, match="non-finite for 3 steps"):
        fit(state, step, batches, settings, Run(tmp_path), distributed.World(),
            checkpoint_extra=dict, checkpoint_metadata={}, lr_of=lambda s: 0.1)


def test_checkpoint_killed_mid_write_keeps_previous(tmp_path, monkeypatch):
    state = toy_state()
    first = save_checkpoint(tmp_path, state, {"data_position": {"n": 1}}, {}, keep_last=2)
    import t2i.train.checkpoint as ckpt_mod

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    with torch.no_grad():
        state.model.weight.add_(1.0)
    import dataclasses
    from t2i.models.io import WeightsError
    with pytest.raises(WeightsError, match="cannot write"):  # one line, tmp folder removed
        save_checkpoint(tmp_path, dataclasses.replace(state, step=5), {}, {}, keep_last=2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first
    restored, extra = load_checkpoint(first, toy_state())
    assert extra["data_position"] == {"n": 1} and restored.step == 0


def test_cli_errors_are_one_line_exit_2(tmp_path, micro_run):
    runner = CliRunner()
    cases = [
        (["--preset", "huge"], "unknown preset"),
        (["--resume", str(tmp_path / "nope")], "no such run folder"),
        (["--set", "unet.bogus=1"], "unet.bogus"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--preset", "huge"], ""),
        (["--vae", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
        (["--data", str(tmp_path / "no-shards"), "--out", str(tmp_path / "r1")], "no-shards"),
    ]
    for args, needle in cases:
        result = runner.invoke(train_cli, args)
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output
        assert "Traceback" not in result.output


def test_vae_from_another_config_is_a_clear_error(tmp_path, micro_run):
    cfg = micro_cfg("train.stage=unet", "vae.z_channels=8", "unet.in_channels=8",
                    "unet.out_channels=8")
    code = run_stage(cfg, tmp_path / "r", vae=str(micro_run / "vae.safetensors"))
    assert code == 2


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma,floor", [(0.0, 0.0), (5.0, 0.0), (5.0, 1.0), (0.0, 1.0)])
def test_snr_weighting_weights_the_x0_error_by_clamped_snr(prediction, gamma, floor):
    """The weighted loss equals clamp(SNR, floor, gamma) * ||x0 - x0_hat||^2, with x0_hat
    recovered from the prediction; unweighted (0, 0) it is SNR (eps) or SNR + 1 (v) times that."""
    from t2i.schedulers import NoiseSchedule
    from t2i.train.step import DiffusionObjective
    schedule = NoiseSchedule.create(prediction_type=prediction)
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 6, 4, 3, 3, generator=gen).unbind(0)  # (6, 4, 3, 3) each
    t = torch.tensor([0, 20, 200, 500, 800, 999])
    guess = torch.randn(6, 4, 3, 3, generator=gen)  # what the "network" predicts
    unet = lambda x, t, states: guess  # noqa: E731
    loss = DiffusionObjective(unet, None, schedule, prediction, gamma, floor)(
        latents, torch.zeros(6, 1, 1), t, noise)
    ab = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * latents + (1 - ab).sqrt() * noise
    x0_hat = ((x_t - (1 - ab).sqrt() * guess) / ab.sqrt() if prediction == "epsilon"
              else ab.sqrt() * x_t - (1 - ab).sqrt() * guess)
    x0_mse = ((x0_hat - latents) ** 2).mean(dim=(1, 2, 3))
    snr = (ab / (1 - ab)).flatten()
    if gamma == 0 and floor == 0:
        x0_weight = snr if prediction == "epsilon" else snr + 1
    else:
        x0_weight = snr.clamp(min=floor or None, max=gamma or None)
    torch.testing.assert_close(loss, x0_weight * x0_mse, rtol=2e-4, atol=1e-6)
