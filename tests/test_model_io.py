"""safetensors save/load (exact round trip, wrapper prefixes, atomic writes, clear errors) and
the parameter / FLOP summary."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from t2i import rng
from t2i.config import get_preset, to_json
from t2i.models import io
from t2i.models.io import WeightsError, load_module, read_metadata, save_module
from t2i.models.summary import count_params, format_summary, summarize
from t2i.models.unet import UNet
from t2i.models.vae import VAE


def small_unet(seed: int = 0) -> UNet:
    cfg = dataclasses.replace(get_preset("tiny").unet, base_channels=16)
    with rng.seeded(seed, "io"):
        return UNet(cfg)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = io.clean_state_dict(a.state_dict()), io.clean_state_dict(b.state_dict())
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_exact_with_metadata(tmp_path):
    src, dst = small_unet(0), small_unet(1)
    meta = {"config": to_json(get_preset("tiny")), "stage": "unet"}
    path = save_module(tmp_path / "unet.safetensors", src, meta)
    assert load_module(path, dst) == meta == read_metadata(path)
    assert_same_state(src, dst)
    assert json.loads(read_metadata(path)["config"])["preset"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == ["unet.safetensors"]  # no temp file left


def test_vae_latent_scale_and_channels_last(tmp_path):
    vae = VAE(dataclasses.replace(get_preset("tiny").vae, base_channels=8))
    vae.latent_scale.fill_(0.18215)
    vae = vae.to(memory_format=torch.channels_last)
    path = save_module(tmp_path / "vae.safetensors", vae, {})
    fresh = VAE(vae.cfg)
    load_module(path, fresh)
    assert fresh.latent_scale.item() == pytest.approx(0.18215)
    assert_same_state(vae, fresh)


def test_compiled_and_ddp_wrapped_have_no_prefixes(tmp_path):
    src = small_unet(0)
    compiled = torch.compile(src)  # state_dict keys gain `_orig_mod.` (no compilation needed)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())

    class Wrapper(nn.Module):  # stands in for DistributedDataParallel's `module.` prefix
        def __init__(self, module: nn.Module):
            super().__init__()
            self.module = module

    for i, wrapped in enumerate((compiled, Wrapper(src), nn.ModuleDict({"unet": compiled}))):
        path = save_module(tmp_path / f"w{i}.safetensors", wrapped, {})
        keys = load_file(str(path)).keys()
        assert not any("_orig_mod" in k or k.startswith("module.") for k in keys)
        if i < 2:
            dst = small_unet(1)
            load_module(path, dst)
            assert_same_state(src, dst)
    dst = torch.compile(small_unet(1))  # and a plain file loads into a compiled module
    load_module(tmp_path / "w1.safetensors", dst)
    assert_same_state(src, dst)


def test_mismatch_errors_name_file_and_keys(tmp_path):
    path = save_module(tmp_path / "unet.safetensors", small_unet(), {})
    wider = UNet(dataclasses.replace(get_preset("tiny").unet, base_channels=32))
    with pytest.raises(WeightsError, match=r"unet\.safetensors.*shape mismatches.*conv_in"):
        load_module(path, wider)
    fewer = UNet(dataclasses.replace(get_preset("tiny").unet, base_channels=16,
                                     num_res_blocks=2))
    with pytest.raises(WeightsError, match="missing keys"):
        load_module(path, fewer)
    with pytest.raises(WeightsError, match="does not exist"):
        load_module(tmp_path / "nope.safetensors", small_unet())
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="junk"):
        load_module(tmp_path / "junk.safetensors", small_unet())
    with pytest.raises(TypeError, match="metadata"):
        save_module(tmp_path / "x.safetensors", small_unet(), {"step": 3})


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = save_module(tmp_path / "unet.safetensors", small_unet(0), {"v": "1"})
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(io, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_module(path, small_unet(1), {"v": "2"})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["unet.safetensors"]


def test_summary_counts_and_preset_sizes():
    rows = {r["model"]: r for r in summarize(get_preset("tiny"))}
    cfg = get_preset("tiny")
    assert rows["unet"]["params"] == count_params(UNet(cfg.unet))
    assert all(r["gflops_per_sample"] > 0 for r in rows.values())
    base = {r["model"]: r for r in summarize(get_preset("base"))}
    assert 855e6 < base["unet"]["params"] < 865e6  # Stable Diffusion 1.x: 859.5M
    assert 100e6 < {r["model"]: r for r in summarize(get_preset("small"))}["unet"]["params"] < 250e6
    table = format_summary(list(rows.values()))
    assert "unet" in table and "vae.decode" in table and "M" in table
