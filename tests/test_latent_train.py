"""Stage 2 from latent shards (issue 14, section 2): the loader's latent mode, the same
computation as online encoding, exact resume, the refusals, and the --cache-latents key that
told two folders' data_000000.tar apart by file name only.

The latent shards here are made by tests/helpers.write_latent_shards (a stand-in for
`t2i-data encode`) from image shards in the real layout, with a random VAE of the micro config.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from t2i.cli.data import main as data_cli
from t2i.cli.eval import main as eval_cli
from t2i.cli.train import main as train_cli
from t2i.config import DataConfig
from t2i.data import DataError, build_loader
from t2i.data.latent_shards import moments_bytes
from t2i.train.unet_stage import build_diffusion_model
from helpers import (MICRO, assert_bitwise_equal, error_line, invoke, micro_cfg, run_stage,
                     save_random_vae, step_moments, write_image_shards, write_latent_shards)

FINAL = ("unet", "ckpt-0000004", "model.safetensors")  # micro: 4 UNet steps, batch 4


def zero_tokens(prompts: list[str]) -> torch.Tensor:
    return torch.zeros(len(prompts), 77, dtype=torch.long)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """Image shards (2 x 8 samples: the 4 micro steps of batch 4 read each once), a random VAE,
    and fp32 latent shards of them whose moments the VAE computed in the online step's batches."""
    root = tmp_path_factory.mktemp("latent-train")
    images = write_image_shards(root / "images", shards=2, per_shard=8)
    cfg = micro_cfg("train.stage=unet", f"data.source={images}")
    vae = save_random_vae(cfg, root / "vae.safetensors")
    latents = write_latent_shards(images, root / "latents", cfg, vae,
                                  known=step_moments(cfg, vae, steps=4))
    return {"root": root, "images": images, "vae": vae, "latents": latents}


def unet_cfg(source: Path, *extra: str):
    return micro_cfg("train.stage=unet", f"data.source={source}", *extra)


def relative_change(a: dict, b: dict, start: dict) -> float:
    """||a - b|| / ||b - start|| over every float tensor: how far two trainings ended apart,
    measured against how far training moved the weights."""
    keys = sorted(k for k in b if b[k].is_floating_point())
    flat = lambda d: torch.cat([d[k].flatten().double() for k in keys])  # noqa: E731
    return float((flat(a) - flat(b)).norm() / (flat(b) - flat(start)).norm())


# ----------------------------------------------------------------------------------------------
# The loader's latent mode
# ----------------------------------------------------------------------------------------------


def keys_of(batches: list[dict]) -> list[tuple[str, str]]:
    return [(Path(s).name, k) for b in batches for s, k in zip(b["shard"], b["key"])]


def take_position(loader, n: int) -> dict:
    """The loader's position after `n` batches."""
    it = iter(loader)
    for _ in range(n):
        next(it)
    return loader.position()


def test_latent_loader_reads_like_the_image_loader_and_resumes_exactly(tmp_path):
    images = write_image_shards(tmp_path / "images", shards=4, per_shard=5)
    cfg = micro_cfg(f"data.source={images}")
    latents = write_latent_shards(images, tmp_path / "latents", cfg,
                                  save_random_vae(cfg, tmp_path / "vae.safetensors"))
    settings = dict(resolution=16, shuffle_buffer=3, workers=2)
    make = lambda source, position=None, batch_size=3, **kw: build_loader(  # noqa: E731
        DataConfig(source=str(source), **settings), batch_size=batch_size, tokenize=zero_tokens,
        seed=5, position=position, **kw)
    take = lambda loader, n: [b for b, _ in zip(loader, range(n))]  # noqa: E731

    full = take(make(latents), 9)  # 27 of 20 samples: windows, shards and an epoch boundary
    # 10 samples a stream a pass: batches 0-5 (18 samples) are all distinct, 0-7 hold all 20
    assert len(set(keys_of(full[:6]))) == 18
    assert set(keys_of(full[:8])) == {(f"data_{i // 5:06d}.tar", f"{i:09d}") for i in range(20)}
    z = cfg.vae.z_channels
    assert all("image" not in b and b["moments"].shape == (3, 2 * z, 8, 8)
               and b["moments"].dtype == torch.float32 for b in full)

    loader = make(latents)
    it = iter(loader)
    for _ in range(4):
        next(it)
    saved = json.loads(json.dumps(loader.position()))
    assert saved["kind"] == "latent_shards" and saved["moments_dtype"] == "fp32"
    rest = take(make(latents, saved), 5)
    assert keys_of(rest) == keys_of(full[4:])
    assert all(torch.equal(a["moments"], b["moments"]) for a, b in zip(rest, full[4:]))
    with pytest.raises(DataError, match="not a 'latent_shards' position"):
        make(latents, take_position(make(images), 1))

    # one epoch: each rank reads 2 shards, one per worker stream, as 2 batches of 5
    ranks = [keys_of(take(make(latents, batch_size=5, rank=r, world_size=2), 2))
             for r in range(2)]
    assert all(len(set(keys)) == 10 for keys in ranks)
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 20


def test_bad_latent_samples_are_skipped_and_counted(tmp_path):
    images = write_image_shards(tmp_path / "images", shards=1, per_shard=5)
    cfg = micro_cfg(f"data.source={images}")
    latents = write_latent_shards(images, tmp_path / "latents", cfg,
                                  save_random_vae(cfg, tmp_path / "vae.safetensors"))
    shard = latents / "data_000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for info, payload in members:
            if info.name == "000000001.moments16.safetensors":
                continue  # no_latent
            if info.name == "000000002.moments16.safetensors":
                payload = payload[:40]  # corrupt_latent: not a safetensors file
            if info.name == "000000003.moments16.safetensors":  # corrupt_latent: shape
                payload = moments_bytes(torch.zeros(2 * cfg.vae.z_channels, 4, 4), "fp32")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    manifest = json.loads((latents / "manifest.json").read_text())  # as if encode wrote them
    manifest["shards"]["data_000000.tar"]["bytes"] = shard.stat().st_size
    (latents / "manifest.json").write_text(json.dumps(manifest))
    loader = build_loader(DataConfig(source=str(latents), resolution=16, shuffle_buffer=1,
                                     max_bad_fraction=1.0),
                          batch_size=2, tokenize=zero_tokens, seed=0)
    batch = next(iter(loader))
    assert batch["key"] == ["000000000", "000000004"]
    assert loader.stats()["bad_by_kind"] == {"corrupt_latent": 2, "no_latent": 1}


# ----------------------------------------------------------------------------------------------
# Stage 2: the same computation as online encoding
# ----------------------------------------------------------------------------------------------


def test_stage2_from_latent_shards_is_the_online_computation(data, tmp_path):
    """fp32 moments computed in the step's batches: bitwise the online run (weights and EMA).
    Moments encoded in other batches (one sample per call here) may differ from the step's in
    the last bits of a conv, since CPU kernels can depend on the batch size (measured: batch 1
    differs, 1.5e-5 of the weight change): bound 1e-3. fp16 moments, as `t2i-data encode` writes
    them by default, round to 2^-11 relative; the weights land 1.1e-3 of the weight change away
    (bf16 moments: 7.4e-3): bound 4e-3."""
    vae = str(data["vae"])
    assert run_stage(unet_cfg(data["images"]), tmp_path / "online", vae=vae) == 0
    assert run_stage(unet_cfg(data["latents"]), tmp_path / "latent", vae=vae) == 0
    online = load_file(str((tmp_path / "online").joinpath(*FINAL)))
    assert_bitwise_equal(online, load_file(str((tmp_path / "latent").joinpath(*FINAL))))
    ema = ("unet", "ckpt-0000004", "ema.safetensors")
    assert_bitwise_equal(load_file(str((tmp_path / "online").joinpath(*ema))),
                         load_file(str((tmp_path / "latent").joinpath(*ema))))

    cfg = unet_cfg(data["images"])
    start = build_diffusion_model(cfg, torch.device("cpu")).state_dict()
    per_sample = write_latent_shards(data["images"], tmp_path / "per-sample", cfg, data["vae"])
    encoded = invoke(data_cli, "encode", data["images"], tmp_path / "fp16", "--vae", vae,
                     "--resolution", 16, "--dtype", "fp16", "--batch-size", 8, "--workers", 0,
                     "--no-progress", "--threads", 1)
    assert encoded.exit_code == 0, encoded.output
    for shards, bound in ((per_sample, 1e-3), (tmp_path / "fp16", 4e-3)):
        out = tmp_path / f"run-{shards.name}"
        assert run_stage(unet_cfg(shards), out, vae=vae) == 0
        got = load_file(str(out.joinpath(*FINAL)))
        assert relative_change(got, online, start) < bound, shards.name
    fp16 = load_file(str((tmp_path / "run-fp16").joinpath(*FINAL)))
    assert any(not torch.equal(fp16[k], online[k]) for k in online)  # it read its own moments


def test_resume_from_latent_shards_is_exact(data, tmp_path):
    """4 steps == 2 steps + resume + 2 steps, with two DataLoader workers. t2i-eval --suite vae
    on the run's own (latent) data is one line."""
    cfg = unet_cfg(data["latents"], "data.workers=2")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_stage(cfg, full, vae=str(data["vae"])) == 0
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "unet" / "ckpt-0000004")
    (resumed / "unet" / "latest").write_text("ckpt-0000002\n")
    assert run_stage(cfg, resumed, resume=True, vae=str(data["vae"])) == 0
    assert_bitwise_equal(load_file(str(full.joinpath(*FINAL))),
                         load_file(str(resumed.joinpath(*FINAL))))
    trainer = torch.load(full / "unet" / "ckpt-0000002" / "trainer.pt", weights_only=True)
    assert trainer["data_positions"][0]["kind"] == "latent_shards"
    # evaluating the VAE on the run's own data: no images there, one line
    result = invoke(eval_cli, full, "--suite", "vae", "--n", 4, "--threads", 1)
    assert result.exit_code == 2
    assert "holds latent shards, not images: pass the image shards with --data" in error_line(
        result.output)


# ----------------------------------------------------------------------------------------------
# Refusals: one Error line, exit 2, no run folder left behind
# ----------------------------------------------------------------------------------------------


def other_vae(data) -> Path:
    path = data["root"] / "other-vae.safetensors"
    if not path.is_file():
        save_random_vae(unet_cfg(data["images"], "train.seed=99"), path)
    return path


def not_a_vae(data) -> Path:
    """A weights file that holds no VAE (say, a UNet checkpoint's model.safetensors)."""
    path = data["root"] / "not-a-vae.safetensors"
    if not path.is_file():
        save_file({"unet.conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(path))
    return path


def break_manifest(how: str):
    def change(folder: Path) -> None:
        manifest = folder / "manifest.json"
        manifest.unlink() if how == "missing" else manifest.write_text("{not json")
    return change


REFUSALS = {
    "stage all": (["--stage", "all"], None, "holds latent shards, which train stage 2 only "
                                            "(now train.stage=all)"),
    "stage vae": (["--stage", "vae"], None, "holds latent shards, which train stage 2 only "
                                            "(now train.stage=vae)"),
    "other vae": (["--vae", other_vae], None, "was encoded by another VAE (sha256"),
    # named as no VAE, not as "another VAE" that the latents should be encoded with again
    "not a vae": (["--vae", not_a_vae], None, "does not match the model"),
    "no vae": (["--vae", None], None, "training from latent shards needs the VAE that "
                                      "encoded them: pass --vae PATH"),
    "resolution": (["--set", "data.resolution=32"], None,
                   "holds latents at resolution 16, not data.resolution 32"),
    # a config whose VAE is not --vae's is refused before the latents are read
    "z channels": (["--set", "vae.z_channels=2", "--set", "unet.in_channels=2",
                    "--set", "unet.out_channels=2"], None,
                   "has another VAE architecture than this run's config: vae.z_channels 4 "
                   "(here 2); start stage 2 from the settings it was trained with"),
    "factor": (["--set", "vae.channel_mult=1,2,2"], None,
               "has another VAE architecture than this run's config: vae.channel_mult (1, 2) "
               "(here (1, 2, 2))"),
    "hflip": (["--set", "data.hflip=true"], None, "the crop was frozen when encoding"),
    "missing manifest": ([], break_manifest("missing"),
                         "holds latent shards but no manifest.json (an unfinished t2i-data "
                         "encode?"),
    "corrupt manifest": ([], break_manifest("corrupt"), "is not a readable JSON manifest"),
    # one .tar of the folder: read as images it would skip every sample as bad
    "one shard": ([], lambda folder: sorted(folder.glob("*.tar"))[0],
                  "is one latent shard: latent shards are read as their folder"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_one_line_and_exit_2(data, tmp_path, case):
    options, change, message = REFUSALS[case]
    latents = data["latents"]
    if change is not None:
        latents = Path(shutil.copytree(latents, tmp_path / "latents"))
        latents = change(latents) or latents  # a change may name another source
    given = {"--stage": "unet", "--vae": str(data["vae"])}
    rest = []
    for name, value in zip(options[::2], options[1::2]):
        if name in given:
            given[name] = value(data) if callable(value) else value
        else:
            rest += [name, value]
    args = [a for name, value in given.items() if value is not None for a in (name, value)]
    sets = [a for item in MICRO for a in ("--set", item)]
    out = tmp_path / "run"
    result = invoke(train_cli, "--preset", "tiny", *sets, "--data", latents, "--out", out,
                    "--threads", 1, *args, *rest)
    assert result.exit_code == 2, result.output
    assert message in error_line(result.output)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# --cache-latents keys samples by the shard's full location
# ----------------------------------------------------------------------------------------------


def test_cache_latents_tells_two_folders_with_the_same_shard_names_apart(tmp_path):
    """dirA (red) and dirB (blue) were packed separately: both hold data_000000.tar with keys
    000000000-000000003. A cache keyed by shard file name + key gave the blue images the red
    images' latents; keyed by the shard's path, the cached run (2 epochs: the second reads the
    cache) is bitwise the uncached one."""
    red = write_image_shards(tmp_path / "dirA", shards=1, per_shard=4, colour=(220, 20, 20))
    blue = write_image_shards(tmp_path / "dirB", shards=1, per_shard=4, colour=(20, 20, 220))
    cfg = unet_cfg(f"{red},{blue}")
    vae = str(save_random_vae(cfg, tmp_path / "vae.safetensors"))
    assert run_stage(cfg, tmp_path / "plain", vae=vae) == 0
    assert run_stage(unet_cfg(f"{red},{blue}", "train.cache_latents=true"), tmp_path / "cached",
                     vae=vae) == 0
    assert_bitwise_equal(load_file(str((tmp_path / "plain").joinpath(*FINAL))),
                         load_file(str((tmp_path / "cached").joinpath(*FINAL))))
    [cache] = (tmp_path / "cached" / "latents").glob("*-rank0.safetensors")
    from t2i.models.io import read_metadata
    keys = json.loads(read_metadata(cache)["keys"])
    assert sorted(keys) == sorted(f"{folder}/data_000000.tar/{i:09d}"
                                  for folder in (red, blue) for i in range(4))
