"""t2i-train's user-facing edges: one clear line and exit 2 for bad input, out of memory without
a partial checkpoint, --text-encoder widths, metrics.jsonl fields and optional TensorBoard."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from t2i.cli.train import main as train_cli, options_to_overrides
from t2i.config import resolve, to_json
from t2i.train import distributed
from t2i.models.io import save_weights
from t2i.train.checkpoint import latest_checkpoint
from t2i.cli.launch import launch
from t2i.train.loop import LoopSettings, OutOfMemory, fit
from t2i.train.run import Run
from t2i.train.step import apply_update
from helpers import micro_cfg, toy_settings, toy_state


def error_lines(output: str) -> list[str]:
    assert "Traceback" not in output, output
    return [line for line in output.splitlines() if line.startswith("Error")]


def invoke(args: list[str]):
    result = CliRunner().invoke(train_cli, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    [line] = error_lines(result.output)
    return line


def test_user_errors_are_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    other = micro_cfg("vae.z_channels=8", "unet.in_channels=8", "unet.out_channels=8")
    from t2i.models.vae import VAE
    save_weights(tmp_path / "other.safetensors", VAE(other.vae).state_dict(),
                 {"config": to_json(other)})
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    out = str(tmp_path / "run")
    cases = [
        (["--data", str(tmp_path / "empty"), "--out", out], "holds no .tar shards"),
        (["--data", str(tmp_path / "nope"), "--out", out], "does not exist"),
        (["--data", "hf://jackyhate/text-to-image-2M", "--out", out], "HF_HUB_OFFLINE"),
        (["--stage", "unet", "--vae", str(tmp_path / "other.safetensors"), "--out", out],
         "another VAE architecture"),
        (["--stage", "unet", "--vae", str(tmp_path / "junk.safetensors"), "--out", out],
         "is not a safetensors file"),
        (["--batch-size", "6", "--grad-accum", "4", "--out", out], "divisible"),
        (["--text-encoder", "NoSuchNet:tag"], "not an open_clip architecture"),
    ]
    for args, needle in cases:
        assert needle in invoke(args), args


def test_offline_pretrained_text_tag_fails_before_training(tmp_path, monkeypatch):
    import open_clip

    def offline(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(open_clip, "download_pretrained", offline)
    line = invoke(["--text-encoder", "ViT-B-32:openai", "--out", str(tmp_path / "r")])
    assert "could not download" in line and "text.weights" in line
    assert not (tmp_path / "r").exists()  # failed before a run folder or stage 1


def test_text_encoder_tag_sets_text_width_and_context_dim():
    cfg = resolve("tiny", None, options_to_overrides({"text_encoder": "ViT-B-32:openai"}))
    assert (cfg.text.model, cfg.text.pretrained) == ("ViT-B-32", "openai")
    assert cfg.text.width == cfg.unet.context_dim == 512 and cfg.text.layers == 12
    from t2i.models.text import build_text_encoder
    build_text_encoder(cfg.text, device="meta", load_weights=False)  # widths agree


def test_text_encoder_local_file_is_loaded_with_its_shapes(tmp_path):
    from safetensors.torch import save_file
    from t2i.models.text import build_text_encoder
    source = micro_cfg("text.width=48", "text.heads=3", "text.layers=2", "unet.context_dim=48")
    encoder = build_text_encoder(source.text)
    path = tmp_path / "text.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(path),
              metadata={"config": to_json(source)})
    cfg = resolve("tiny", None, options_to_overrides({"text_encoder": str(path)}))
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.unet.context_dim) == (48, 2, 3, 48)
    loaded = build_text_encoder(cfg.text)
    for k, v in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def toy_fit(tmp_path: Path, step, total: int = 4, save_every: int = 2):
    settings = LoopSettings(stage="toy", total_steps=total, global_batch=2, log_every=1,
                            sample_every=0, save_every=save_every, keep_last=0, max_nonfinite=3,
                            show_progress=False)
    return fit(toy_state(), step, iter(lambda: torch.ones(2, 3), None), settings,
               Run(tmp_path), distributed.World(), checkpoint_extra=dict,
               checkpoint_metadata={}, lr_of=lambda s: 0.1,
               bad_samples=lambda: {"bad": 1, "samples": 8})


def toy_step(fail_at: int | None = None):
    def step(state, batch):
        if state.step == fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        objective = lambda inp: state.model(inp).squeeze(1)  # noqa: E731
        state, metrics = apply_update(state, objective, [(batch,)], toy_settings(),
                                      __import__("contextlib").nullcontext)
        metrics["t"] = torch.tensor([5, 995])
        return state, metrics
    return step


def test_out_of_memory_saves_nothing_partial(tmp_path):
    with pytest.raises(OutOfMemory) as info:
        toy_fit(tmp_path, toy_step(fail_at=3), total=6)
    assert info.value.step == 3 and info.value.last_checkpoint.name == "ckpt-0000002"
    assert latest_checkpoint(tmp_path / "toy").name == "ckpt-0000002"
    assert not list((tmp_path / "toy").glob("ckpt-0000003*"))


def test_out_of_memory_message_names_batch_and_hint(tmp_path, monkeypatch, capsys):
    import t2i.cli.launch as launch_mod

    def oom(*args, **kwargs):
        raise OutOfMemory(7, tmp_path / "run" / "unet" / "ckpt-0000005")

    monkeypatch.setattr(launch_mod, "train", oom)
    cfg = micro_cfg("train.batch_size=8", "train.grad_accum=2")
    assert launch(cfg, Run(tmp_path / "run"), False, torch.device("cpu"), None) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "out of memory" in line and "step 7" in line and "--batch-size 8" in line
    assert "micro-batch 4" in line and "--grad-accum" in line and "ckpt-0000005" in line


def test_metrics_jsonl_fields(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    toy_fit(tmp_path, toy_step())
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "skipped", "skipped_total", "bad_samples",
                "samples_per_s", "loss_by_t"):
        assert key in records[-1], key
    by_t = records[-1]["loss_by_t"]
    assert len(by_t) == 10 and by_t[1:9] == [None] * 8 and by_t[0] is not None
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_gets_the_same_scalars_when_installed(tmp_path, monkeypatch):
    written: list[tuple[str, float, int]] = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed", 0, 0))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    toy_fit(tmp_path, toy_step())
    tags = {tag for tag, _, _ in written}
    for name in ("loss", "lr", "grad_norm", "samples_per_s", "skipped", "bad_samples",
                 "loss_by_t/0", "loss_by_t/9"):
        assert f"toy/{name}" in tags, name
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert ("toy/loss", last["loss"], 4) in written and written[-1][0] == "closed"
