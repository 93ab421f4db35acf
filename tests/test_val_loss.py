"""Validation loss (issue 16, section 3): the held-out split of shards by name hash, a training
loader that never reads it, and a deterministic loss on a fixed set: the same checkpoint gives
the same number in training's metrics.jsonl and from `t2i-eval --suite val-loss`, on the shapes
set and on held-out shards."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.cli.eval import main as eval_cli
from t2i.config import ConfigError, DataConfig
from t2i.data import DataError, build_loader
from t2i.data.pack import ShardWriter, jpeg_bytes, sample_json
from t2i.data.sources import Shard, shard_name, split_validation, val_hash, validation_shards
from t2i.validation import held_out, val_timesteps
from helpers import error_line, invoke, micro_cfg, run_stage


def write_shards(folder: Path, shards: int, per_shard: int, size: int = 16) -> Path:
    """`shards` x `per_shard` samples (random-colour blocks, unique keys s<shard>k<i>)."""
    rng = np.random.default_rng(0)
    with ShardWriter(folder, per_shard) as writer:
        for i in range(shards * per_shard):
            image = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(
                (size, size), Image.Resampling.NEAREST)
            writer.write(f"s{i // per_shard:02d}k{i % per_shard:02d}",
                         {"jpg": jpeg_bytes(image, 90), "json": sample_json(f"block {i}")})
    return folder


def val_records(run: Path) -> dict[int, dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r.get("kind") == "val"}


def eval_val_loss(target: Path, *args) -> dict:
    result = invoke(eval_cli, target, "--suite", "val-loss", "--device", "cpu", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):result.output.rindex("}") + 1])


def test_val_timesteps_are_the_midpoints_of_equal_bins():
    assert val_timesteps(1000, 8).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    assert val_timesteps(10, 10).tolist() == list(range(10))
    assert val_timesteps(1000, 1).tolist() == [500]


def test_val_fraction_split_is_by_name_hash_whatever_the_order():
    shards = [Shard(f"/data/part-{i:05d}.tar", 1) for i in range(200)]
    train, val = split_validation(shards, 0.1)
    held = {s.url for s in val}
    assert held == {s.url for s in shards if val_hash(shard_name(s.url)) < 0.1}
    assert 5 < len(held) < 40 and len(train) + len(val) == 200
    shuffled = shards[:]
    random.Random(1).shuffle(shuffled)
    assert {s.url for s in split_validation(shuffled, 0.1)[1]} == held
    # a shard's side depends on its name only: more shards do not move the old ones
    more = shards + [Shard(f"/data/extra-{i}.tar", 1) for i in range(50)]
    assert held <= {s.url for s in split_validation(more, 0.1)[1]}
    # another folder, same file names: the same split
    elsewhere = [Shard(s.url.replace("/data/", "/mnt/x/"), 1) for s in shards]
    assert {shard_name(s.url) for s in split_validation(elsewhere, 0.1)[1]} == {
        shard_name(u) for u in held}


def test_a_tiny_fraction_still_holds_out_one_shard_and_never_all():
    shards = [Shard(f"/d/{name}.tar", 1) for name in ("a", "b", "c")]
    train, val = split_validation(shards, 1e-9)
    assert len(val) == 1 and len(train) == 2
    assert val[0] == min(shards, key=lambda s: val_hash(shard_name(s.url)))
    with pytest.raises(DataError, match="holds out all"):
        split_validation(shards[:1], 0.5)


@pytest.mark.parametrize("held_out_by", ["fraction", "source"])
def test_training_loader_never_yields_a_key_of_a_val_shard(tmp_path, held_out_by):
    folder = write_shards(tmp_path / "shards", shards=6, per_shard=3)
    if held_out_by == "fraction":
        cfg = DataConfig(source=str(folder), resolution=16, val_fraction=0.3)
    else:
        cfg = DataConfig(source=str(folder), resolution=16,
                         val_source=str(folder / "data_000002.tar"))
    val = {shard_name(s.url) for s in validation_shards(cfg.source, cfg.subset, cfg.val_source,
                                                        cfg.val_fraction)}
    assert 1 <= len(val) < 6
    loader = build_loader(cfg, batch_size=2, tokenize=lambda p: torch.zeros(len(p), 77),
                          seed=0, in_process=True)
    seen = set()
    for _, batch in zip(range(30), loader):  # 60 samples: more than three epochs
        seen.update((shard_name(s), k) for s, k in zip(batch["shard"], batch["key"]))
    expected = {(f"data_{i:06d}.tar", f"s{i:02d}k{j:02d}") for i in range(6) for j in range(3)
                if f"data_{i:06d}.tar" not in val}
    assert seen == expected  # every training sample, none of the held-out shards
    names = {s for s, _ in seen}
    assert not names & val


def test_held_out_samples_come_from_the_val_shards_in_name_order(tmp_path):
    folder = write_shards(tmp_path / "shards", shards=6, per_shard=3)
    cfg = micro_cfg(f"data.source={folder}", "data.val_fraction=0.3")
    val = sorted(shard_name(s.url) for s in validation_shards(str(folder), "512", "", 0.3))
    first = held_out(cfg, 4)
    shards = [k.split(":")[0] for k in first.keys]
    assert shards == [val[i // 3] for i in range(min(4, 3 * len(val)))]
    assert held_out(cfg, 2).keys == first.keys[:2]  # the first n of a bigger set
    assert torch.equal(held_out(cfg, 4).rows, first.rows)


def test_val_settings_are_checked():
    with pytest.raises(ConfigError, match="train.val_every needs held-out data"):
        micro_cfg("data.source=/some/shards", "train.val_every=10")
    with pytest.raises(ConfigError, match="either data.val_source"):
        micro_cfg("data.val_source=/held", "data.val_fraction=0.1")
    with pytest.raises(ConfigError, match="train.val_timesteps"):
        micro_cfg("schedule.num_train_timesteps=4", "train.val_timesteps=5")
    micro_cfg("train.val_every=10")  # the shapes set holds out its own draws


VAL = ["train.stage=unet", "train.val_every=2", "train.val_samples=6", "train.val_batch_size=4",
       "train.val_timesteps=4"]


def test_val_loss_in_training_equals_t2i_eval_on_the_same_checkpoint(micro_run, tmp_path):
    run = tmp_path / "run"
    assert run_stage(micro_cfg(*VAL), run, vae=str(micro_run / "vae.safetensors")) == 0
    records = val_records(run)
    assert sorted(records) == [2, 4]
    for step, record in records.items():
        assert record["stage"] == "unet" and record["val_n"] == 6
        assert record["val_timesteps"] == [125, 375, 625, 875]
        assert len(record["val_loss_by_t"]) == 4 and all(v > 0 for v in record["val_loss_by_t"])
        assert record["val_loss"] == pytest.approx(sum(record["val_loss_by_t"]) / 4, rel=1e-12)
        report = eval_val_loss(run / "unet" / f"ckpt-{step:07d}")
        assert report["val_loss"] == record["val_loss"]  # bitwise: the same float
        assert report["val_loss_by_t"] == record["val_loss_by_t"]
    assert records[2]["val_loss"] != records[4]["val_loss"]  # the weights moved
    again = eval_val_loss(run)  # the run folder: its latest checkpoint, step 4
    assert again["val_loss"] == records[4]["val_loss"] and again["n"] == 6
    fewer = eval_val_loss(run, "--n", 3)
    assert fewer["n"] == 3 and fewer["val_loss"] != again["val_loss"]


def test_val_loss_on_held_out_shards(micro_run, tmp_path, caplog):
    folder = write_shards(tmp_path / "shards", shards=6, per_shard=3)
    run = tmp_path / "run"
    cfg = micro_cfg(*VAL, f"data.source={folder}", "data.val_fraction=0.3",
                    "train.unet_steps=2")
    assert run_stage(cfg, run, vae=str(micro_run / "vae.safetensors")) == 0
    record = val_records(run)[2]
    val = validation_shards(str(folder), "512", "", 0.3)
    assert record["val_n"] == min(6, 3 * len(val))
    report = eval_val_loss(run)
    assert report["val_loss"] == record["val_loss"]
    assert "val_fraction" in report["source"]
    # --data: other held-out shards; the whole folder is 18 samples
    caplog.clear()
    assert eval_val_loss(run, "--data", folder, "--n", 18)["n"] == 18
    assert "fewer than" not in caplog.text
    assert eval_val_loss(run, "--data", folder, "--n", 30)["n"] == 18  # fewer: said once
    assert "hold 18 usable sample(s), fewer than the 30 asked (--n)" in caplog.text


def test_val_loss_of_a_shard_run_without_held_out_shards_is_one_line(micro_run, tmp_path):
    folder = write_shards(tmp_path / "shards", shards=2, per_shard=2)
    run = tmp_path / "run"
    cfg = micro_cfg("train.stage=unet", f"data.source={folder}", "train.unet_steps=2")
    assert run_stage(cfg, run, vae=str(micro_run / "vae.safetensors")) == 0
    result = invoke(eval_cli, run, "--suite", "val-loss", "--device", "cpu")
    assert result.exit_code == 2
    assert "no held-out shards" in error_line(result.output)


def test_held_out_latent_shards_give_the_loss_of_their_images(tmp_path):
    """A latent-shard folder (stored moments) and the image shards it was encoded from hold
    out the same shards and give the same validation loss, up to the VAE's batch rounding."""
    from t2i.train.unet_stage import build_diffusion_model
    from t2i.train.vae_stage import load_vae
    from t2i.validation import build_val_set, val_loss
    from helpers import save_random_vae, write_image_shards, write_latent_shards

    images = write_image_shards(tmp_path / "images", shards=5, per_shard=3)
    cfg = micro_cfg(*VAL, f"data.source={images}", "data.val_fraction=0.3")
    vae_path = save_random_vae(cfg, tmp_path / "vae.safetensors")
    latents = write_latent_shards(images, tmp_path / "latents", cfg, vae_path)
    vae = load_vae(cfg, vae_path, torch.device("cpu"))
    model = build_diffusion_model(cfg, torch.device("cpu")).requires_grad_(False)
    results = {}
    for name, source in (("images", images), ("latents", latents)):
        cfg_here = micro_cfg(*VAL, f"data.source={source}", "data.val_fraction=0.3")
        val_set = build_val_set(cfg_here, vae, torch.device("cpu"))
        results[name] = (val_set, val_loss(model["unet"], model["text"], val_set, cfg_here,
                                           torch.device("cpu")))
    (a, ra), (b, rb) = results["images"], results["latents"]
    assert [k.split(":")[1] for k in a.keys] == [k.split(":")[1] for k in b.keys]
    assert torch.allclose(a.latents, b.latents, atol=1e-5)
    assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-4)
    # training from the latent shards never reads the held-out ones either
    held = {k.split(":")[0] for k in b.keys}
    loader = build_loader(DataConfig(source=str(latents), resolution=16, val_fraction=0.3),
                          batch_size=2, tokenize=lambda p: torch.zeros(len(p), 77), seed=0,
                          in_process=True)
    seen = {shard_name(s) for _, batch in zip(range(12), loader) for s in batch["shard"]}
    assert seen and not seen & held and len(seen) + len(held) == 5


def test_held_out_latent_shards_of_another_vae_or_resolution_are_refused(tmp_path):
    """Validation refuses latent shards as training does: made by another VAE (the loss would
    mean nothing) or without moments at data.resolution (named, not "no usable sample")."""
    from t2i.models.vae_files import vae_sha256
    from t2i.validation import held_out
    from helpers import save_random_vae, write_image_shards, write_latent_shards

    images = write_image_shards(tmp_path / "images", shards=3, per_shard=2)
    cfg = micro_cfg("train.stage=unet", f"data.source={images}")
    ours = save_random_vae(cfg, tmp_path / "ours.safetensors", latent_scale=0.7)
    theirs = save_random_vae(cfg, tmp_path / "theirs.safetensors", latent_scale=0.5)
    latents = write_latent_shards(images, tmp_path / "latents", cfg, theirs)
    held = micro_cfg(*VAL, f"data.source={images}", f"data.val_source={latents}")
    assert len(held_out(held, 4, vae_identity=vae_sha256(theirs)).keys) == 4
    with pytest.raises(DataError, match="encoded by another VAE"):
        held_out(held, 4, vae_identity=vae_sha256(ours))
    other_size = micro_cfg(*VAL, f"data.source={images}", f"data.val_source={latents}",
                           "data.resolution=32")
    with pytest.raises(DataError, match=r"holds latents at resolution 16, not the run's "
                                        r"data.resolution 32: encode the held-out shards with "
                                        r"--resolution 32$"):  # a run's resolution is fixed
        held_out(other_size, 4)


def test_a_val_record_goes_to_tensorboard_per_timestep():
    from t2i.train.run import write_tensorboard

    class Writer:
        def __init__(self):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (value, step)

        def flush(self):
            pass

    writer = Writer()
    write_tensorboard(writer, {"stage": "unet", "step": 6, "kind": "val", "val_loss": 0.5,
                               "val_loss_by_t": [0.7, 0.3], "val_timesteps": [250, 750]})
    assert writer.scalars == {"unet/val_loss": (0.5, 6), "unet/val_loss_by_t/250": (0.7, 6),
                              "unet/val_loss_by_t/750": (0.3, 6)}
