"""--cache-latents: cached moments equal fresh encodings, a cached run trains exactly like an
uncached one, resume reads the cache, another VAE never reuses it."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from t2i import rng
from t2i.config import to_json
from t2i.data import build_loader
from t2i.models.text import tokenize
from t2i.models.io import save_weights
from t2i.train import distributed
from t2i.train.latents import LatentCache
from t2i.train.run import Run
from t2i.train.stages import Env, build_vae, load_vae
from t2i.train.unet_stage import latent_cache
from helpers import assert_bitwise_equal, micro_cfg, run_stage


def fake_moments(calls: list):
    def encode(images):
        calls.append(len(images))
        mean = images.mean(dim=1, keepdim=True)  # (m, 1, H, W)
        return mean, -mean
    return encode


def test_cache_encodes_each_key_once_and_persists(tmp_path):
    images = torch.randn(4, 3, 2, 2)
    calls: list[int] = []
    cache = LatentCache(tmp_path, {"vae_sha256": "a"})
    mean, logvar = cache.moments(["k0", "k1", "k2", "k3"], images, fake_moments(calls))
    assert torch.equal(mean, images.mean(dim=1, keepdim=True)) and torch.equal(logvar, -mean)
    again, _ = cache.moments(["k2", "k9", "k0", "k1"], images, fake_moments(calls))
    assert calls == [4, 1]  # only the new key k9 went through the encoder
    assert torch.equal(again[0], mean[2]) and torch.equal(again[1], images[1].mean(0, keepdim=True))
    cache.save()
    reloaded = LatentCache(tmp_path, {"vae_sha256": "a"})
    assert reloaded.entries.keys() == cache.entries.keys()
    got, _ = reloaded.moments(["k3"], images[:1], fake_moments(calls))
    assert calls == [4, 1] and torch.equal(got[0], mean[3])
    other = LatentCache(tmp_path, {"vae_sha256": "b"})  # another VAE: another file, empty
    assert other.path != cache.path and not other.entries


def random_vae(cfg, path: Path) -> Path:
    """An untrained VAE file is enough for stage 2 mechanics (and much faster than stage 1)."""
    vae = build_vae(cfg, torch.device("cpu"))
    vae.latent_scale.fill_(0.7)
    save_weights(path, vae.state_dict(), {"config": to_json(cfg), "stage": "vae"})
    return path


def test_cached_run_equals_uncached_and_resumes(tmp_path):
    cfg = micro_cfg("train.stage=unet")
    vae = str(random_vae(cfg, tmp_path / "vae.safetensors"))
    plain, cached = tmp_path / "plain", tmp_path / "cached"
    assert run_stage(cfg, plain, vae=vae) == 0
    cfg_cache = micro_cfg("train.stage=unet", "train.cache_latents=true")
    assert run_stage(cfg_cache, cached, vae=vae) == 0
    final = ("unet", "ckpt-0000004", "model.safetensors")
    assert_bitwise_equal(load_file(str(plain.joinpath(*final))), load_file(str(cached.joinpath(*final))))

    # the cache holds the posterior moments of every training image, equal to a fresh encoding
    [cache_file] = (cached / "latents").glob("*-rank0.safetensors")
    with safe_open(str(cache_file), framework="pt") as f:
        import json
        keys = json.loads(f.metadata()["keys"])
    stored = load_file(str(cache_file))
    assert len(keys) == 4 * 4 and keys[:4] == [f"shapes-0-{j}" for j in range(4)]
    model = load_vae(cfg, Path(vae), torch.device("cpu"))
    loader = build_loader(cfg.data, batch_size=4, tokenize=tokenize,
                          seed=rng.derive_seed(cfg.train.seed, "unet-data"))
    with torch.no_grad():
        post = model.encode(next(iter(loader))["image"])
    torch.testing.assert_close(stored["mean"][:4], post.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(stored["logvar"][:4], post.logvar, rtol=0, atol=1e-6)

    # resume from step 2: steps 3-4 read their latents from the cache and land on the same bits
    resumed = tmp_path / "resumed"
    shutil.copytree(cached, resumed)
    shutil.rmtree(resumed / "unet" / "ckpt-0000004")
    (resumed / "unet" / "latest").write_text("ckpt-0000002\n")
    with torch.no_grad():  # poison the cached rows of steps 3-4: the resumed run must read them
        poisoned = {k: v.clone() for k, v in stored.items()}
        poisoned["mean"][8:] += 1.0
    from t2i.models.io import read_metadata
    save_weights(resumed / "latents" / cache_file.name, poisoned, read_metadata(cache_file))
    assert run_stage(cfg_cache, resumed, resume=True, vae=vae) == 0
    a = load_file(str(cached.joinpath(*final)))
    b = load_file(str(resumed.joinpath(*final)))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the poisoned latents were used

    shutil.rmtree(resumed)  # and with the true cache, resume is bitwise
    shutil.copytree(cached, resumed)
    shutil.rmtree(resumed / "unet" / "ckpt-0000004")
    (resumed / "unet" / "latest").write_text("ckpt-0000002\n")
    assert run_stage(cfg_cache, resumed, resume=True, vae=vae) == 0
    assert_bitwise_equal(a, load_file(str(resumed.joinpath(*final))))


def test_another_encoder_precision_gets_another_cache_file(tmp_path):
    # bf16 moments differ from fp32 ones in the third digit: a run resumed with another
    # --precision must not read them
    cfg = micro_cfg("train.stage=unet", "train.cache_latents=true")
    vae = random_vae(cfg, tmp_path / "vae.safetensors")
    env = Env(torch.device("cpu"), distributed.World(), resume=False)
    run = Run(tmp_path / "run")
    paths = {precision: latent_cache(micro_cfg("train.stage=unet", "train.cache_latents=true",
                                               f"train.precision={precision}"),
                                     run, env, vae).path
             for precision in ("fp32", "bf16")}
    assert paths["fp32"] != paths["bf16"]
    assert latent_cache(cfg, run, env, vae).path == paths["fp32"]  # auto on a CPU: fp32
