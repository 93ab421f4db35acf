"""The text tower of a training run: a frozen random tower is refused; `small` and `base` take
pretrained open_clip towers and fail at once offline, without trying the network; `--text-encoder
scratch` trains a tower from random init; a frozen tower is stored once per run
(RUN/text.safetensors), never in checkpoints, EMA files or the optimizer, and sampling loads it
from there, checked by sha256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from helpers import MICRO, error_line, invoke, micro_cfg, run_stage
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from t2i.cli.train import options_to_overrides
from t2i.config import ConfigError, apply_overrides, check_text_training, get_preset
from t2i.models.checkpoints import latest_checkpoint, load_trainer, read_weights
from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference, save_tower
from t2i.models.io import WeightsError, save_weights
from t2i.models.text import TextWeightsError, build_text_encoder, pretrained_path
from t2i.sample import Pipeline, generate, load_pipeline
from t2i.schedulers import NoiseSchedule
from t2i.train.stages import build_diffusion_model
from t2i.train.step import DiffusionObjective
from t2i.train.unet_stage import trained_modules

PROMPTS = ["a red circle", "a blue square on the left"]


# ----------------------------------------------------------------------------------------------
# The refusal
# ----------------------------------------------------------------------------------------------


def test_frozen_random_tower_is_refused_with_what_to_pass(tmp_path):
    result = invoke(train_cli, "--text-frozen", "--out", tmp_path / "r")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "frozen but has random weights" in line
    for option in ("--text-encoder ViT-B-32:laion2b_s34b_b79k", "--text-encoder PATH",
                   "--text-encoder scratch"):
        assert option in line
    assert not (tmp_path / "r").exists()  # refused before a run folder or stage 1
    with pytest.raises(ConfigError, match="random weights"):
        check_text_training(micro_cfg("text.frozen=true").text)
    check_text_training(get_preset("tiny").text)  # tiny trains its tower: unchanged
    check_text_training(get_preset("small").text)  # pretrained


def test_vae_stage_alone_needs_no_text_tower(tmp_path):
    sets = [a for s in MICRO + ["text.frozen=true"] for a in ("--set", s)]
    result = invoke(train_cli, *sets, "--stage", "vae", "--device", "cpu",
                    "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "vae.safetensors").is_file()


# ----------------------------------------------------------------------------------------------
# Pretrained defaults, offline
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty Hugging Face cache, and every way to the network recorded: a test asserts the
    list stays empty (a raise would be caught and reported as a download failure)."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    calls = []

    def record(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise OSError(f"{name} called")
        return call

    monkeypatch.setattr(open_clip, "download_pretrained", record("download_pretrained"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", record("hf_hub_download"))
    return calls


@pytest.mark.parametrize("preset, tag", [("small", "ViT-B-32/laion2b_s34b_b79k"),
                                         ("base", "ViT-L-14/laion2b_s32b_b82k")])
def test_presets_fail_offline_at_once_with_the_local_file_how_to(preset, tag, tmp_path,
                                                                 monkeypatch, no_network):
    import huggingface_hub
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub, "get_session", lambda: no_network.append("probe"))
    cfg = get_preset(preset)
    assert cfg.text.frozen and cfg.text.width == cfg.unet.context_dim
    result = invoke(train_cli, "--preset", preset, "--out", tmp_path / "r")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert f"could not download open_clip weights {tag} (offline: HF_HUB_OFFLINE is set" in line
    assert "--text-encoder PATH" in line and "HF_HUB_CACHE" in line and "hf download" in line
    assert "--local-dir DIR" in line and "(here DIR/open_clip_model.safetensors" in line
    assert no_network == []  # no download, no retry, not even the probe
    assert not (tmp_path / "r").exists()


def test_unreachable_hub_is_probed_once_then_fails_without_download(monkeypatch, no_network):
    import huggingface_hub
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probes = []

    class Unreachable:
        def head(self, url, timeout):
            probes.append((url, timeout))
            raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "get_session", Unreachable)
    with pytest.raises(TextWeightsError, match=r"offline: cannot reach .*Name or service") as err:
        pretrained_path(get_preset("small").text)
    assert "--text-encoder PATH" in str(err.value)
    assert no_network == [] and len(probes) == 1 and probes[0][1] <= 10


def test_cached_weights_are_used_without_the_network(monkeypatch, tmp_path, no_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_session", lambda: no_network.append("probe"))
    repo = tmp_path / "hub-cache" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    cached = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert pretrained_path(get_preset("small").text) == cached
    assert no_network == []


def test_openai_tags_keep_quick_gelu_when_only_the_architecture_is_built():
    from open_clip.transformer import QuickGELU

    def acts(tag):
        cfg = apply_overrides(get_preset("small"), [f"text.pretrained={tag}"]).text
        enc = build_text_encoder(cfg, device="meta", load_weights=False)
        return {type(m) for m in enc.modules() if type(m).__name__ in ("GELU", "QuickGELU")}

    assert acts("openai") == {QuickGELU}
    assert QuickGELU not in acts("laion2b_s34b_b79k")


# ----------------------------------------------------------------------------------------------
# scratch
# ----------------------------------------------------------------------------------------------


def test_scratch_is_a_trainable_tower_whose_parameters_get_gradients():
    cfg = apply_overrides(get_preset("small"), options_to_overrides({"text_encoder": "scratch"}))
    assert (cfg.text.frozen, cfg.text.pretrained, cfg.text.weights) == (False, "", "")
    check_text_training(cfg.text)
    frozen = options_to_overrides({"text_encoder": "scratch", "text_frozen": True})
    with pytest.raises(ConfigError, match="random weights"):  # --text-frozen wins, refused
        check_text_training(apply_overrides(get_preset("small"), frozen).text)

    micro = apply_overrides(get_preset("tiny"), MICRO + ["text.frozen=true"]
                            + options_to_overrides({"text_encoder": "scratch"}))
    model = build_diffusion_model(micro, torch.device("cpu"))
    assert trained_modules(model, micro) is model  # the tower is trained and checkpointed
    objective = DiffusionObjective(model["unet"], model["text"],
                                   NoiseSchedule.from_config(micro.schedule), "epsilon", 0.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised output layers pass no gradient to the context yet
        for p in model["unet"].parameters():
            if not p.any():
                p.normal_(0.0, 0.02, generator=gen)  # in place: this test's model only
    latents = torch.randn(2, 4, 4, 4, generator=gen)  # (B, z, h, w)
    tokens = open_clip.tokenize(PROMPTS, context_length=micro.text.context_length)
    objective(latents, tokens, torch.tensor([10, 500]), torch.randn(2, 4, 4, 4, generator=gen)
              ).mean().backward()
    grads = {n: p.grad for n, p in model["text"].named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


# ----------------------------------------------------------------------------------------------
# A frozen tower from a local file: stored once, not in checkpoints, sampled back exactly
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory):
    """Both MICRO stages with a frozen custom tower (1 block, width 32) read from a local file
    written here; returns (run folder, the tower file, the config)."""
    root = tmp_path_factory.mktemp("frozen-text")
    source = root / "tower.safetensors"
    with torch.random.fork_rng():
        torch.manual_seed(3)
        save_weights(source, build_text_encoder(micro_cfg().text).state_dict())
    cfg = micro_cfg("text.frozen=true", f"text.weights={source}", "train.val_every=4",
                    "train.val_samples=4", "train.val_batch_size=4", "train.val_timesteps=2")
    assert run_stage(cfg, root / "run") == 0
    return root / "run", source, cfg


def test_frozen_tower_is_stored_once_and_in_no_checkpoint(frozen_run):
    run, source, cfg = frozen_run
    assert (run / TOWER_FILE).is_file()
    unet = build_diffusion_model(cfg, torch.device("cpu"))["unet"]
    for ckpt in sorted((run / "unet").glob("ckpt-*")):
        for name in ("model.safetensors", "ema.safetensors"):
            tensors, metadata = read_weights(ckpt, name)
            assert tensors and all(k.startswith("unet.") for k in tensors), (ckpt, name)
            reference = TowerReference.from_json(metadata[METADATA_KEY], ckpt / name)
            assert reference.weights == str(source) and len(reference.sha256) == 64
        moments = load_trainer(ckpt / "trainer.pt")["optimizer"]["state"]  # AdamW, per param
        assert len(moments) == sum(1 for p in unet.parameters() if p.requires_grad)


def test_validation_loss_in_training_equals_t2i_eval_of_the_stored_tower(frozen_run):
    from t2i.cli.eval import main as eval_cli
    run = frozen_run[0]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    [trained] = [r for r in records if r.get("kind") == "val"]  # step 4, frozen tower
    result = invoke(eval_cli, run, "--suite", "val-loss", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])
    assert report["val_loss"] == trained["val_loss"]  # the same float


def test_sampling_a_frozen_run_matches_the_tower_from_its_original_file(frozen_run):
    run, source, cfg = frozen_run
    pipe = load_pipeline(run)
    original = build_text_encoder(cfg.text).requires_grad_(False).eval()  # from the file
    reference = Pipeline(cfg=pipe.cfg, vae=pipe.vae, unet=pipe.unet, text=original,
                         device=pipe.device, source=pipe.source)
    a = generate(pipe, PROMPTS, steps=3, guidance=2.0, seed=5).images
    b = generate(reference, PROMPTS, steps=3, guidance=2.0, seed=5).images
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    for k, v in original.state_dict().items():
        assert torch.equal(pipe.text.state_dict()[k], v), k


def test_resume_reuses_the_runs_tower_without_the_original_file(frozen_run, tmp_path):
    import shutil
    run0, source, cfg = frozen_run
    run = Path(shutil.copytree(run0, tmp_path / "run"))
    stat = (run / TOWER_FILE).stat()
    cfg6 = apply_overrides(cfg, ["train.unet_steps=6"])
    source.rename(tmp_path / "gone.safetensors")  # the original file is not needed any more
    try:
        assert run_stage(cfg6, run, resume=True) == 0
        # the command line too: its checks before the start accept the run's stored copy
        result = invoke(train_cli, "--resume", run, "--steps", 7, "--device", "cpu",
                        "--threads", 1)
        assert result.exit_code == 0, result.output
    finally:
        (tmp_path / "gone.safetensors").rename(source)
    again = (run / TOWER_FILE).stat()
    assert (again.st_ino, again.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)  # written once
    assert latest_checkpoint(run / "unet").name == "ckpt-0000007"


def test_a_replaced_or_damaged_tower_file_is_refused_in_one_line(frozen_run, tmp_path):
    import shutil
    run = Path(shutil.copytree(frozen_run[0], tmp_path / "run"))
    ckpt = latest_checkpoint(run / "unet")
    recorded = read_weights(ckpt, "ema.safetensors")[1][METADATA_KEY]
    reference = TowerReference.from_json(recorded, ckpt)
    with torch.random.fork_rng():
        torch.manual_seed(4)  # other weights, saved with the run's reference: a forged copy
        other = build_text_encoder(frozen_run[2].text, load_weights=False)
    save_tower(run / TOWER_FILE, other, reference)
    with pytest.raises(WeightsError, match="does not hold the weights this run was trained"):
        load_pipeline(run)
    result = invoke(sample_cli, run, "a red circle", "--out", tmp_path / "s", "--steps", "2",
                    "--device", "cpu")
    assert result.exit_code == 2 and "sha256" in error_line(result.output)

    data = bytearray((frozen_run[0] / TOWER_FILE).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    (run / TOWER_FILE).write_bytes(bytes(data))
    result = invoke(sample_cli, run, "a red circle", "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 2 and "damaged" in error_line(result.output)
    (run / TOWER_FILE).unlink()
    result = invoke(sample_cli, run, "a red circle", "--out", tmp_path / "s", "--device", "cpu")
    assert result.exit_code == 2 and "is missing" in error_line(result.output)
    assert json.loads(recorded)["sha256"] == reference.sha256
