"""The text-to-image-2M recipe (configs/*.toml, README "Training on text-to-image-2M"): every
config loads and validates (a renamed key breaks here, not on a user's GPU), the stages of a
preset chain (same UNet and text tower for --init-from, the stage-1 VAE architecture for --vae,
the same held-out shards at 256 and 512 px), and the whole recipe in miniature through the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i.cli.data import main as data_cli
from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from t2i.config import check_text_training, load_file, resolve
from t2i.config.sections import UNetConfig, VAEConfig
from helpers import MICRO_WIDTHS, invoke, write_image_shards

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
STAGES = ("1-vae", "2-unet256", "3-unet512", "4-unet1024")
RESOLUTIONS = {"2-unet256": 256, "3-unet512": 512, "4-unet1024": 1024}


def recipe(preset: str) -> dict:
    """Stage name -> the resolved config of configs/PRESET-STAGE.toml."""
    return {stage: resolve("tiny", CONFIGS / f"{preset}-{stage}.toml") for stage in STAGES}


def vae_architecture(vae: VAEConfig) -> VAEConfig:
    """The fields that shape the VAE's tensors (not its stage-1 training settings)."""
    return dataclasses.replace(vae, channels_last=True,
                               **{k: getattr(VAEConfig(), k) for k in VAEConfig.TRAINING_ONLY})


def unet_architecture(unet: UNetConfig) -> UNetConfig:
    """The fields that shape the UNet's tensors (not how it runs)."""
    return dataclasses.replace(unet, channels_last=True, gradient_checkpointing=False)


def test_the_recipe_is_these_files():
    expected = {f"{p}-{s}.toml" for p in ("small", "base") for s in STAGES}
    assert {p.name for p in CONFIGS.glob("*.toml")} == expected


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_config_loads_validates_and_names_its_preset(path):
    data = load_file(path)
    cfg = resolve("tiny", path)  # unknown keys, wrong types, bad values, bad wiring: ConfigError
    assert data["preset"] == cfg.preset == path.name.split("-")[0]
    stage = path.stem.split("-", 1)[1]
    assert cfg.train.stage == ("vae" if stage == "1-vae" else "unet")
    if cfg.train.stage == "unet":
        check_text_training(cfg.text)  # a pretrained frozen tower, never a random one
        assert cfg.data.resolution == RESOLUTIONS[stage]
    assert cfg.train.batch_size % cfg.train.grad_accum == 0


@pytest.mark.parametrize("preset", ["small", "base"])
def test_the_stages_of_a_preset_chain(preset):
    cfgs = recipe(preset)
    diffusion = [cfgs[s] for s in STAGES[1:]]
    for cfg in diffusion:  # --init-from copies tensors by name and shape; --vae needs stage 1's
        assert unet_architecture(cfg.unet) == unet_architecture(diffusion[0].unet)
        assert cfg.text == diffusion[0].text
        assert vae_architecture(cfg.vae) == vae_architecture(cfgs["1-vae"].vae)
    at_256, at_512 = cfgs["2-unet256"], cfgs["3-unet512"]
    assert at_256.data.source == at_512.data.source  # one encode pass holds both resolutions
    assert at_256.data.val_fraction == at_512.data.val_fraction > 0  # the same held-out shards
    assert at_256.train.val_every > 0 and at_512.train.val_every > 0
    assert cfgs["4-unet1024"].data.subset == "1024"


# ----------------------------------------------------------------------------------------------
# The recipe in miniature, through the CLI: each stage is its configs/small-*.toml with tiny
# model sizes on top, on generated shards in the text-to-image-2M layout.
# ----------------------------------------------------------------------------------------------

# Micro widths, a trainable custom text tower instead of the preset's pretrained one (offline),
# a discriminator small enough for 16 px images that joins at step 1, no compile, no workers.
TINY = [*MICRO_WIDTHS, "vae.channel_mult=1,2", "text.model=custom", "text.pretrained=",
        "vae.disc_channels=8", "vae.disc_layers=2", "vae.disc_start=1", "data.workers=0",
        "train.compile=false", "train.warmup_steps=1", "train.sample_every=0"]
R = 16  # stage 2 at R, then 2R from R's weights, then 4R online as the 1024 px fine-tune
STAGE2 = ["train.unet_steps=2", "train.save_every=2", "train.val_every=2",
          "train.val_samples=4", "train.val_batch_size=4"]


def train(config: str, out: Path, *args: str) -> None:
    """t2i-train --config configs/CONFIG with TINY and `args` (more --set or options) on top."""
    sets = [a for item in TINY for a in ("--set", item)]
    result = invoke(train_cli, "--config", CONFIGS / config, *sets, *args, "--out", out,
                    "--device", "cpu", "--log-every", "1")
    assert result.exit_code == 0, result.output[-3000:]


def val_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val_loss" in r]


def report(result) -> dict:
    """The JSON report a t2i-eval run printed (its output after any log lines)."""
    assert result.exit_code == 0, result.output[-3000:]
    return json.loads(result.output[result.output.index("{"):])


def test_the_small_recipe_chains_through_the_cli(tmp_path):
    shards = write_image_shards(tmp_path / "shards", shards=3, per_shard=8, size=4 * R)
    runs, latents = tmp_path / "runs", tmp_path / "latents"

    train("small-1-vae.toml", runs / "vae", "--data", shards, "--set", f"data.resolution={R}",
          "--set", "train.vae_steps=2", "--set", "train.save_every=2")
    assert (runs / "vae" / "vae.safetensors").is_file()
    last = json.loads((runs / "vae" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "gan_g" in last and "gan_d" in last  # the recipe's PatchGAN term was on

    result = invoke(data_cli, "encode", shards, latents, "--vae", runs / "vae", "--resolution", R,
                    "--resolution", 2 * R, "--device", "cpu", "--workers", 0, "--no-progress")
    assert result.exit_code == 0, result.output[-3000:]
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["resolutions"] == [R, 2 * R]
    assert sum(s["samples"] for s in manifest["shards"].values()) == 24

    train("small-2-unet256.toml", runs / "r", "--data", latents, "--vae",
          runs / "vae" / "vae.safetensors", "--set", f"data.resolution={R}",
          *[a for item in STAGE2 for a in ("--set", item)])
    train("small-3-unet512.toml", runs / "2r", "--data", latents, "--init-from", runs / "r",
          "--set", f"data.resolution={2 * R}", *[a for item in STAGE2 for a in ("--set", item)])
    train("small-4-unet1024.toml", runs / "4r", "--data", shards, "--init-from", runs / "2r",
          "--set", f"data.resolution={4 * R}", "--set", "train.unet_steps=1",
          "--set", "train.save_every=1")

    parents = {name: json.loads((runs / name / "config.json").read_text())["init_from"]
               for name in ("2r", "4r")}
    assert parents["2r"]["stage"] == "unet" and Path(parents["2r"]["checkpoint"]).parent.parent \
        == runs / "r"
    assert Path(parents["4r"]["checkpoint"]).parent.parent == runs / "2r"
    for name in ("r", "2r"):  # validation loss at the last step, on the held-out shard
        [record] = val_records(runs / name)
        assert record["step"] == 2 and len(record["val_loss_by_t"]) == 8
    trainer = torch.load(runs / "2r" / "unet" / "ckpt-0000002" / "trainer.pt", weights_only=True)
    assert trainer["data_positions"][0]["num_shards"] == 2  # the third is held out
    evaluated = report(invoke(eval_cli, runs / "2r", "--suite", "val-loss", "--device", "cpu"))
    assert evaluated["val_loss"] == val_records(runs / "2r")[0]["val_loss"]  # the final EMA

    result = invoke(sample_cli, runs / "4r", "a picture of noise", "--steps", 2, "--out",
                    tmp_path / "samples", "--device", "cpu")
    assert result.exit_code == 0, result.output[-3000:]
    [png] = [p for p in (tmp_path / "samples").glob("*.png") if p.name != "grid.png"]
    assert Image.open(png).size == (4 * R, 4 * R)
    vae_report = report(invoke(eval_cli, runs / "4r", "--suite", "vae", "--data", shards,
                               "--n", 4, "--device", "cpu"))
    assert vae_report["psnr_db"] > 0
