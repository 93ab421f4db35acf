"""UNet: shapes per preset, determinism, gradients, conditioning, attention maths, embedding
golden numbers, checkpointing, compile and bf16 agreement."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from t2i import rng
from t2i.config import PRESETS, get_preset
from t2i.models.layers import CrossAttention, SelfAttention, timestep_embedding
from t2i.models.unet import UNet


def reduced(preset: str):
    """The preset's UNet structure (levels, blocks, attention, heads, context) at small width:
    4 channels per head at the first level."""
    cfg = get_preset(preset).unet
    return dataclasses.replace(cfg, base_channels=4 * cfg.num_heads)


def randomize_zero_inits(model: torch.nn.Module, seed: int = 1) -> None:
    """Give zero-initialised parameters (output conv, transformer proj_out) small random values,
    so that every parameter influences the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def inputs(cfg, batch: int = 2, size: int = 16, length: int = 77, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, length, cfg.context_dim, generator=gen)
    return x, t, context


@pytest.fixture(scope="module")
def tiny_unet():
    cfg = get_preset("tiny").unet
    with rng.seeded(0, "unet-test"):
        model = UNet(cfg)
    randomize_zero_inits(model)
    return cfg, model


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_shapes_every_preset(preset):
    cfg = reduced(preset)
    model = UNet(cfg)
    levels = len(cfg.channel_mult)
    size = 2 ** (levels - 1) * 2
    x, t, context = inputs(cfg, size=size)
    with torch.no_grad():
        out = model(x, t, context)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv


def test_same_seed_same_bits(tiny_unet):
    cfg, _ = tiny_unet
    models = []
    for _ in range(2):
        with rng.seeded(7, "unet"):
            models.append(UNet(cfg))
    a, b = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for m in models:
        randomize_zero_inits(m)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(models[0](x, t, context), models[1](x, t, context))


def test_gradients_reach_every_parameter():
    cfg = reduced("tiny")
    model = UNet(cfg)
    randomize_zero_inits(model)
    x, t, context = inputs(cfg)
    model(x, t, context).square().mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name


def test_output_depends_on_context_and_t(tiny_unet):
    cfg, model = tiny_unet
    x, t, context = inputs(cfg)
    with torch.no_grad():
        base = model(x, t, context)
        other_context = model(x, t, context + torch.randn_like(context))
        other_t = model(x, (t + 137) % 1000, context)
        float_t = model(x, t.float(), context)
    assert (base - other_context).abs().max() > 1e-4
    assert (base - other_t).abs().max() > 1e-4
    assert torch.allclose(base, float_t, atol=1e-6)  # int and integer-valued float agree


def test_context_mask_hides_padding(tiny_unet):
    cfg, model = tiny_unet
    x, t, context = inputs(cfg)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[:, :5] = True
    changed = context.clone()
    changed[:, 5:] += torch.randn_like(changed[:, 5:])
    with torch.no_grad():
        a, b = model(x, t, context, mask), model(x, t, changed, mask)
        c = model(x, t, changed)
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - c).abs().max() > 1e-4


def test_channels_last_input_and_scalar_t(tiny_unet):
    cfg, model = tiny_unet
    x, t, context = inputs(cfg, batch=1)
    with torch.no_grad():
        a = model(x, t, context)
        b = model(x.contiguous(memory_format=torch.channels_last), t[0], context)
    assert torch.allclose(a, b, atol=1e-6)


def plain_attention(x, context, q_w, k_w, v_w, out, heads, key_mask=None):
    """Multi-head attention written out with matmul and softmax (float64 reference)."""
    b, n, dim = x.shape
    d = dim // heads
    split = lambda y: y.view(b, y.shape[1], heads, d).transpose(1, 2)  # (B, h, N, d)
    q, k, v = split(x @ q_w.T), split(context @ k_w.T), split(context @ v_w.T)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, h, N, L)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, dim)
    return out(mixed)


def test_sdpa_attention_matches_plain_math():
    gen = torch.Generator().manual_seed(0)
    b, n, l, heads, dim, ctx_dim = 2, 10, 7, 3, 12, 5
    x = torch.randn(b, n, dim, generator=gen, dtype=torch.float64)
    context = torch.randn(b, l, ctx_dim, generator=gen, dtype=torch.float64)
    mask = torch.ones(b, l, dtype=torch.bool)
    mask[0, 4:] = False
    cross = CrossAttention(dim, ctx_dim, heads).double()
    k_w, v_w = cross.kv.weight.chunk(2, dim=0)
    for key_mask in (None, mask):
        ref = plain_attention(x, context, cross.q.weight, k_w, v_w, cross.out, heads, key_mask)
        assert torch.allclose(cross(x, context, key_mask), ref, atol=1e-12)
    self_attn = SelfAttention(dim, heads).double()
    q_w, k_w, v_w = self_attn.qkv.weight.chunk(3, dim=0)
    ref = plain_attention(x, x, q_w, k_w, v_w, self_attn.out, heads)
    assert torch.allclose(self_attn(x), ref, atol=1e-12)


def test_timestep_embedding_golden():
    t = torch.tensor([0, 1, 10.5, 999])
    for flip, shift, dim in ((True, 0.0, 8), (False, 1.0, 8), (True, 0.0, 7)):
        out = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift).numpy()
        half = dim // 2
        freqs = np.exp(-np.log(10000.0) * np.arange(half, dtype=np.float64) / (half - shift))
        args = t.double().numpy()[:, None] * freqs[None]
        parts = [np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)]
        ref = np.concatenate(parts + ([np.zeros((4, 1))] if dim % 2 else []), axis=1)
        np.testing.assert_allclose(out, ref, atol=2e-4)  # float32 of t * freq up to ~1e3
        assert out.shape == (4, dim)


def test_gradient_checkpointing_same_gradients():
    cfg = reduced("tiny")
    with rng.seeded(3, "ckpt"):
        plain = UNet(cfg)
    checkpointed = UNet(dataclasses.replace(cfg, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    randomize_zero_inits(plain)
    randomize_zero_inits(checkpointed)
    x, t, context = inputs(cfg)
    grads = []
    for model in (plain, checkpointed):
        model(x, t, context).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name


def test_bf16_autocast_close_to_fp32(tiny_unet):
    """Tolerance: relative L2 error below 3% (bf16 has an 8-bit mantissa, ~0.4% per op)."""
    cfg, model = tiny_unet
    x, t, context = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, context)
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.03, rel


@pytest.mark.slow
def test_compiled_fullgraph_matches_eager(tiny_unet):
    cfg, model = tiny_unet
    x, t, context = inputs(cfg)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert (compiled(x, t.float(), context) - model(x, t.float(), context)).abs().max() < 1e-4


def test_config_mismatch_is_clear():
    cfg = dataclasses.replace(get_preset("tiny").unet, attention_levels=(True,))
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(cfg)
    cfg = dataclasses.replace(get_preset("tiny").unet, num_heads=3)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(cfg)


def test_forward_ignores_training_flag():
    # Pure forward: same output in train and eval mode (no dropout or mode switches).
    cfg = reduced("tiny")
    model = UNet(cfg)
    randomize_zero_inits(model)
    x, t, context = inputs(cfg)
    with torch.no_grad():
        a = model.train()(x, t, context)
        b = model.eval()(x, t, context)
    assert torch.equal(a, b)


def test_coordinates_are_pixel_centres_left_to_right_top_to_bottom():
    from t2i.models.unet import coordinates
    grid = coordinates(torch.zeros(3, 4, 2, 4))  # (B, 2, H=2, W=4)
    assert grid.shape == (3, 2, 2, 4)
    torch.testing.assert_close(grid[0, 0, 0], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    torch.testing.assert_close(grid[0, 1, :, 0], torch.tensor([-0.5, 0.5]))
    assert torch.equal(grid[2], grid[0])


def test_coord_channels_reach_the_input_conv():
    from t2i.models.unet import coordinates
    cfg = dataclasses.replace(reduced("tiny"), coord_channels=True)
    model = UNet(cfg).eval()
    assert model.conv_in.in_channels == cfg.in_channels + 2
    seen = []
    model.conv_in.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x, t, context = inputs(cfg, batch=2, length=8)
    with torch.no_grad():
        assert model(x, t, context).shape == x.shape
    assert torch.equal(seen[0][:, :cfg.in_channels], x)
    assert torch.equal(seen[0][:, cfg.in_channels:], coordinates(x))


def test_fourier_positions_follow_the_image_axes():
    from t2i.models.layers import fourier_positions
    h, w, dim = 2, 4, 16
    pos = fourier_positions(h, w, dim).view(h, w, dim)
    n = dim // 4
    xs = torch.tensor([-0.75, -0.25, 0.25, 0.75])
    # channel 0: sin(pi * 0.5 * x), rising left to right and the same on every row
    torch.testing.assert_close(pos[0, :, 0], torch.sin(math.pi * 0.5 * xs))
    assert torch.equal(pos[1, :, :2 * n], pos[0, :, :2 * n])
    # y channels: sin(pi * 0.5 * y) at rows y = -0.5, 0.5, constant along a row
    torch.testing.assert_close(pos[:, 0, 2 * n], torch.sin(math.pi * 0.5 * torch.tensor([-0.5, 0.5])))
    assert torch.equal(pos[:, 1:, 2 * n:], pos[:, :1, 2 * n:].expand(h, w - 1, 2 * n))
    # the highest frequency is 2 ** (4 (n-1) / n - 1); cos follows sin
    f_top = 2.0 ** (4 * (n - 1) / n - 1)
    torch.testing.assert_close(pos[0, :, 2 * n - 1], torch.cos(math.pi * f_top * xs))
    with pytest.raises(ValueError, match="divisible by 4"):
        fourier_positions(2, 2, 6)


def test_attention_positions_break_translation_symmetry_inside_attention():
    """With positions on, the same weights give a different output, and the added features are
    exactly fourier_positions of each attention level's grid."""
    from t2i.models.layers import SpatialTransformer, fourier_positions
    cfg = dataclasses.replace(reduced("tiny"), attention_positions=True)
    model = UNet(cfg).eval()
    plain = UNet(dataclasses.replace(cfg, attention_positions=False)).eval()
    randomize_zero_inits(model)
    plain.load_state_dict(model.state_dict())  # no new parameters
    x, t, context = inputs(cfg, batch=2, length=8)
    seen = []
    first = next(m for m in model.modules() if isinstance(m, SpatialTransformer))
    first.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    proj = []
    first.proj_in.register_forward_hook(lambda mod, args, out: proj.append(out))
    with torch.no_grad():
        a, b = model(x, t, context), plain(x, t, context)
    assert not torch.allclose(a, b)
    n_tokens, width = proj[0].shape[1:]
    side = int(math.isqrt(n_tokens))
    torch.testing.assert_close(seen[0] - proj[0], fourier_positions(side, side, width)[None].expand_as(proj[0]))


def test_context_pool_feeds_the_masked_mean_text_state_to_every_resblock():
    from t2i.models.unet import pooled_context
    context = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(pooled_context(context, mask),
                               torch.stack([context[0, :2].mean(0), context[1, 0]]))
    torch.testing.assert_close(pooled_context(context, None), context.mean(1))

    cfg = dataclasses.replace(reduced("tiny"), context_pool=True)
    model = UNet(cfg).eval()
    x, t, context = inputs(cfg, batch=2, length=8)
    with torch.no_grad():  # zero-initialised: the pool changes nothing until trained
        plain = UNet(dataclasses.replace(cfg, context_pool=False)).eval()
        plain.load_state_dict(model.state_dict(), strict=False)
        randomize_zero_inits(plain)
        model.load_state_dict(plain.state_dict(), strict=False)  # all but context_mlp
        assert not model.context_mlp[2].weight.any()
        torch.testing.assert_close(model(x, t, context), plain(x, t, context))
        randomize_zero_inits(model.context_mlp)
        seen = []
        model.context_mlp.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
        assert not torch.allclose(model(x, t, context), plain(x, t, context))
    torch.testing.assert_close(seen[0], context.mean(1))
