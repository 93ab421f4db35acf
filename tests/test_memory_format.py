"""Activation layout (`unet.channels_last`, `vae.channels_last`; `t2i-bench --memory-format`):
NHWC and NCHW give the same values and gradients, every convolution sees the layout chosen, the
default is channels-last, and the bench applies the choice to its models and records it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from bench import core
from bench.__main__ import main as bench_main
from t2i import rng
from t2i.config import PRESETS, apply_overrides, config_from_json, get_preset, to_json
from t2i.models.unet import UNet
from t2i.models.vae import VAE


def randomize_zero_inits(model: nn.Module) -> None:
    """Small random values in zero-initialised weights, so every layer shapes the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def twins(build, cfg) -> dict[bool, nn.Module]:
    """The same weights built with channels_last on and off."""
    with rng.seeded(0, "memory-format"):
        nhwc = build(dataclasses.replace(cfg, channels_last=True))
    randomize_zero_inits(nhwc)
    nchw = build(dataclasses.replace(cfg, channels_last=False))
    nchw.load_state_dict(nhwc.state_dict())
    return {True: nhwc, False: nchw}


def conv_inputs(model: nn.Module, run) -> list[torch.Tensor]:
    """The input of every Conv2d call while `run()` runs."""
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
               for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def assert_layout(tensors: list[torch.Tensor], channels_last: bool) -> None:
    """Every tensor in the layout asked for, and not also in the other (C > 1 and H * W > 1, so
    the two layouts differ)."""
    assert tensors
    for i, x in enumerate(tensors):
        nhwc, nchw = x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous()
        assert (nhwc, nchw) == (channels_last, not channels_last), (i, tuple(x.shape), x.stride())


def assert_same(a: torch.Tensor, b: torch.Tensor, name: str = "") -> None:
    """Equal up to fp32 rounding: the layouts sum in different orders (relative L2 ~1e-6 seen)."""
    rel = ((a - b).norm() / b.norm().clamp(min=1e-12)).item()
    assert rel < 1e-5, (name, rel)


def unet_inputs(cfg, batch: int = 2, size: int = 16):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, 8, cfg.context_dim, generator=gen)
    return x, t, context


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_channels_last_is_the_default(preset):
    cfg = get_preset(preset)
    assert cfg.unet.channels_last is True and cfg.vae.channels_last is True


def test_the_choice_is_a_config_key_that_round_trips_and_old_configs_keep_the_default():
    cfg = apply_overrides(get_preset("tiny"), ["unet.channels_last=false", "vae.channels_last=false"])
    assert cfg.unet.channels_last is False and cfg.vae.channels_last is False
    assert config_from_json(to_json(cfg)) == cfg
    old = json.loads(to_json(get_preset("tiny")))  # metadata written before the key existed
    del old["unet"]["channels_last"], old["vae"]["channels_last"]
    assert config_from_json(json.dumps(old)) == get_preset("tiny")


@pytest.mark.parametrize("channels_last", [True, False])
def test_unet_convolutions_see_the_chosen_layout(channels_last):
    models = twins(UNet, get_preset("tiny").unet)
    x, t, context = unet_inputs(models[True].cfg)
    for given in (x, x.contiguous(memory_format=torch.channels_last)):  # whatever the caller passes
        with torch.no_grad():
            seen = conv_inputs(models[channels_last], lambda: models[channels_last](given, t, context))
        assert_layout(seen, channels_last)


def test_unet_same_values_and_gradients_in_both_layouts():
    models = twins(UNet, get_preset("tiny").unet)
    x, t, context = unet_inputs(models[True].cfg)
    outputs, grads = {}, {}
    for channels_last, model in models.items():
        out = model(x, t, context)
        assert out.is_contiguous()  # NCHW out either way
        out.square().mean().backward()
        outputs[channels_last] = out.detach()
        grads[channels_last] = {n: p.grad for n, p in model.named_parameters()}
    assert_same(outputs[False], outputs[True])
    for name, grad in grads[True].items():
        assert_same(grads[False][name], grad, name)


@pytest.mark.parametrize("channels_last", [True, False])
def test_vae_convolutions_see_the_chosen_layout(channels_last):
    models = twins(VAE, get_preset("tiny").vae)
    model = models[channels_last]
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        seen = conv_inputs(model.encoder, lambda: model.encode(x))
        assert_layout(seen, channels_last)
        z = model.encode(x).mean
        seen = conv_inputs(model.decoder, lambda: model.decode(z))
        assert_layout(seen, channels_last)


def test_vae_same_values_and_gradients_in_both_layouts():
    models = twins(VAE, get_preset("tiny").vae)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    results = {}
    for channels_last, model in models.items():
        recon, posterior = model(x, eps)
        assert recon.is_contiguous()
        recon.abs().mean().backward()
        results[channels_last] = (recon.detach(), posterior.mean.detach(), posterior.logvar.detach(),
                                  {n: p.grad for n, p in model.named_parameters()})
    for name, a, b in zip(("recon", "mean", "logvar"), results[False][:3], results[True][:3]):
        assert_same(a, b, name)
    for name, grad in results[True][3].items():
        assert_same(results[False][3][name], grad, name)


# ----------------------------------------------------------------------------------------------
# t2i-bench --memory-format
# ----------------------------------------------------------------------------------------------


@core.register_case("_test_layout")
def _layout_case(ctx):
    cfg = core.preset_config(ctx)
    return [{"case": "_test_layout", "name": "layout", "median_s": 0.0, "p10_s": 0.0,
             "p90_s": 0.0, "repeats": 1, "unet": cfg.unet.channels_last,
             "vae": cfg.vae.channels_last}]


def test_bench_context_sets_both_models():
    for memory_format, channels_last in (("channels_last", True), ("contiguous", False)):
        cfg = core.preset_config(core.BenchContext(preset="small", memory_format=memory_format))
        assert cfg.unet.channels_last is channels_last and cfg.vae.channels_last is channels_last
        assert dataclasses.replace(cfg.unet, channels_last=True) == get_preset("small").unet


@pytest.mark.parametrize("option, channels_last", [([], True),
                                                   (["--memory-format", "contiguous"], False)])
def test_bench_option_reaches_the_cases_and_the_json(tmp_path, option, channels_last):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(bench_main, ["_test_layout", "--device", "cpu", *option,
                                             "--json", str(out)])
    assert result.exit_code == 0, result.output
    document = json.loads(out.read_text())
    expected = "channels_last" if channels_last else "contiguous"
    assert document["environment"]["memory_format"] == expected
    assert document["context"]["memory_format"] == expected
    (row,) = document["results"]
    assert row["unet"] is channels_last and row["vae"] is channels_last


def test_bench_bad_memory_format_is_exit_2():
    result = CliRunner().invoke(bench_main, ["_test_layout", "--memory-format", "nhwc"])
    assert result.exit_code == 2 and "--memory-format" in result.output
