"""Model cases: `unet` (training step and forward, with a diffusers peer), `vae`, `text`.

`unet` times a full training step (forward, MSE loss, backward, AdamW) and a no-grad forward of
our UNet. When `diffusers` is importable (never a t2i dependency) it also builds
`UNet2DConditionModel` with the same block widths, blocks per level, attention levels, heads,
context width and norm groups, checks the parameter counts agree within 2%, and times both
alternately in the same run; `ratio` on our rows is peer time / our time (above 1: we are faster).
With compile on, both models are also timed under torch.compile.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from bench import core
from bench.core import BenchContext, preset_config, register_case, result_row
from bench.flops import throughput
from t2i.config import Config, UNetConfig
from t2i.models.summary import count_params, forward_flops

PARAM_TOLERANCE = 0.02


def _batch(ctx: BenchContext, cfg: Config, model: str) -> int:
    """Per-step batch: the preset's training batch for tiny, smaller for big models on CPU."""
    if ctx.quick:
        return 2
    cpu = ctx.torch_device.type == "cpu"
    if cfg.preset == "tiny":
        return cfg.train.batch_size
    if model == "text":
        return 8
    return (2 if cfg.preset == "small" else 1) if cpu else 16


def _autocast(ctx: BenchContext):
    return torch.autocast(ctx.torch_device.type, dtype=torch.bfloat16, enabled=ctx.dtype == "bf16")


def _optimizer(model: nn.Module, ctx: BenchContext) -> torch.optim.Optimizer:
    # Fused AdamW where the device supports it (as the trainer does); same for ours and peer.
    try:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4)


def _train_step(model: nn.Module, inputs: tuple, ctx: BenchContext,
                unwrap: Callable[[Any], torch.Tensor] = lambda y: y) -> Callable[[], None]:
    optimizer = _optimizer(model, ctx)

    def step() -> None:
        with _autocast(ctx):
            loss = unwrap(model(*inputs)).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _forward(model: nn.Module, inputs: tuple, ctx: BenchContext) -> Callable[[], Any]:
    def forward() -> Any:
        with torch.no_grad(), _autocast(ctx):
            return model(*inputs)

    return forward


def _randomize_zero_inits(model: nn.Module) -> None:
    """Timing with a zero output conv is fine, but give both models the same kind of weights."""
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1 and not param.any():
                param.normal_(std=0.02)


def peer_unet(cfg: UNetConfig, sample_size: int) -> nn.Module:
    """diffusers' UNet2DConditionModel with our UNet's structure (SD-1.x style blocks)."""
    from diffusers import UNet2DConditionModel

    widths = tuple(cfg.base_channels * m for m in cfg.channel_mult)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D"
                               for a in cfg.attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                             for a in reversed(cfg.attention_levels)),
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks,
        transformer_layers_per_block=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' legacy name: it is the number of heads
        norm_num_groups=cfg.norm_groups, flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=int(cfg.freq_shift), use_linear_projection=True)


def _have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - optional peer
        return False
    return True


def _rows(case: str, stats: dict[str, dict], info: dict[str, dict], ctx: BenchContext,
          peers: dict[str, str]) -> list[dict]:
    rows = []
    for name, st in stats.items():
        extra = dict(info[name])
        samples = extra.pop("samples")
        flops = extra.pop("flops_per_sample", None)
        row = result_row(case, name, st, **extra,
                         **throughput(st, ctx=ctx, samples=samples, flops_per_sample=flops))
        peer = peers.get(name)
        if peer in stats:
            row["ratio"] = stats[peer]["median_s"] / st["median_s"]
            row["ratio_vs"] = peer
        rows.append(row)
    return rows


@register_case("unet")
def unet_case(ctx: BenchContext) -> list[dict]:
    cfg = preset_config(ctx)
    device, batch = ctx.torch_device, _batch(ctx, cfg, "unet")
    f = cfg.vae.downsample_factor
    size = (ctx.resolution or cfg.data.resolution) // f
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.unet.in_channels, size, size, generator=gen).to(device)
    t = torch.randint(0, cfg.schedule.num_train_timesteps, (batch,), generator=gen).to(device)
    context = torch.randn(batch, cfg.text.context_length, cfg.unet.context_dim,
                          generator=gen).to(device)
    inputs = (x, t, context)

    from t2i.models.unet import UNet

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ours = UNet(cfg.unet).to(device)
    _randomize_zero_inits(ours)
    with torch.device("meta"):
        fwd_flops = forward_flops(UNet(cfg.unet), *(torch.zeros(1, *a.shape[1:], dtype=a.dtype)
                                                    for a in inputs))
    shape = f"{batch}x{cfg.unet.in_channels}x{size}x{size}"
    base_info = {"batch": batch, "input": shape, "params_m": count_params(ours) / 1e6}
    fns: dict[str, Callable] = {}
    info: dict[str, dict] = {}
    peers: dict[str, str] = {}

    def add(name: str, fn: Callable, flops: float, **extra: Any) -> None:
        fns[name] = fn
        info[name] = {**base_info, **extra, "samples": batch, "flops_per_sample": flops}

    add("train", _train_step(ours, inputs, ctx), 3 * fwd_flops)
    add("forward", _forward(ours, inputs, ctx), fwd_flops)
    if device.type == "cpu":  # weights stored NHWC too (activations always are): no reorders
        ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        add("train channels_last weights", _train_step(ours_cl, inputs, ctx), 3 * fwd_flops)
    peer = None
    if _have_diffusers() and not ctx.quick:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            peer = peer_unet(cfg.unet, size).to(device)
        _randomize_zero_inits(peer)
        peer_params = count_params(peer)
        mismatch = abs(peer_params - count_params(ours)) / count_params(ours)
        if mismatch > PARAM_TOLERANCE:
            raise RuntimeError(f"peer has {peer_params / 1e6:.2f}M params vs ours "
                               f"{count_params(ours) / 1e6:.2f}M (> {PARAM_TOLERANCE:.0%} apart)")

        def sample(y: Any) -> torch.Tensor:
            return y.sample

        peer_info = {"params_m": peer_params / 1e6}
        add("train peer", _train_step(peer, inputs, ctx, sample), 3 * fwd_flops, **peer_info)
        add("forward peer", _forward(peer, inputs, ctx), fwd_flops, **peer_info)
        peers.update({"train": "train peer", "forward": "forward peer",
                      "train channels_last weights": "train peer"})
        if device.type == "cpu":  # is the peer faster channels-last? (it is not, on CPU)
            peer_cl = copy.deepcopy(peer).to(memory_format=torch.channels_last)
            cl_inputs = (x.contiguous(memory_format=torch.channels_last), t, context)
            add("train peer channels_last", _train_step(peer_cl, cl_inputs, ctx, sample),
                3 * fwd_flops, **peer_info)
    stats = core.time_alternating(fns, ctx=ctx)
    rows = _rows("unet", stats, info, ctx, peers)

    if ctx.compile:
        fns, info_c, peers = {}, {}, {}
        compiled = torch.compile(copy.deepcopy(ours), fullgraph=True)
        fns["train compiled"] = _train_step(compiled, inputs, ctx)
        info_c["train compiled"] = info["train"]
        if peer is not None:
            compiled_peer = torch.compile(copy.deepcopy(peer))
            fns["train compiled peer"] = _train_step(compiled_peer, inputs, ctx, lambda y: y.sample)
            info_c["train compiled peer"] = info["train peer"]
            peers["train compiled"] = "train compiled peer"
        stats = core.time_alternating(fns, ctx=ctx, warmup=max(ctx.warmup, 2))
        rows += _rows("unet", stats, info_c, ctx, peers)
    return rows


@register_case("vae")
def vae_case(ctx: BenchContext) -> list[dict]:
    from t2i.models.vae import VAE

    cfg = preset_config(ctx)
    device, batch = ctx.torch_device, _batch(ctx, cfg, "vae")
    res = ctx.resolution or cfg.data.resolution
    if device.type == "cpu" and res > 256:
        res = 256  # a 512x512 decode takes tens of seconds on a CPU; the row says the size
    if ctx.quick:
        res = min(res, 64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = VAE(cfg.vae).to(device)
    f = cfg.vae.downsample_factor
    gen = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, res, res, generator=gen) * 2 - 1).to(device)
    latents = torch.randn(batch, cfg.vae.z_channels, res // f, res // f, generator=gen).to(device)
    eps = torch.randn_like(latents)
    with torch.device("meta"):
        meta_vae = VAE(cfg.vae)
        enc_flops = forward_flops(lambda a: meta_vae.encode(a).mean, torch.zeros(1, 3, res, res))
        dec_flops = forward_flops(meta_vae.decode, torch.zeros(1, *latents.shape[1:]))

    def roundtrip(model: nn.Module):
        def loss_input(img: torch.Tensor) -> torch.Tensor:
            post = model.encode(img)
            recon = model.decode(post.mean + post.std * eps)
            return (recon.float() - img).abs().mean() + 1e-6 * post.kl().float().mean()
        return loss_input

    def train(model: nn.Module) -> Callable[[], None]:
        optimizer = _optimizer(model, ctx)
        fn = roundtrip(model)

        def step() -> None:
            with _autocast(ctx):
                loss = fn(images)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def encode(model):
        return _forward(lambda img: model.encode(img).mean, (images,), ctx)

    def decode(model):
        return _forward(model.decode, (latents,), ctx)

    base = {"batch": batch, "input": f"{batch}x3x{res}x{res}",
            "params_m": count_params(vae) / 1e6, "samples": batch}
    fns = {"train": train(vae), "encode": encode(vae), "decode": decode(vae)}
    info = {"train": {**base, "flops_per_sample": 3 * (enc_flops + dec_flops)},
            "encode": {**base, "flops_per_sample": enc_flops},
            "decode": {**base, "flops_per_sample": dec_flops}}
    rows = _rows("vae", core.time_alternating(fns, ctx=ctx), info, ctx, {})
    if ctx.compile:
        compiled = copy.deepcopy(vae)
        compiled.encoder = torch.compile(compiled.encoder, fullgraph=True)
        compiled.decoder = torch.compile(compiled.decoder, fullgraph=True)
        fns = {"train compiled": train(compiled), "encode compiled": encode(compiled),
               "decode compiled": decode(compiled)}
        info = {name + " compiled": value for name, value in info.items()}
        stats = core.time_alternating(fns, ctx=ctx, warmup=max(ctx.warmup, 2))
        rows += _rows("vae", stats, info, ctx, {})
    return rows


@register_case("text")
def text_case(ctx: BenchContext) -> list[dict]:
    from t2i.models.text import build_text_encoder, tokenize

    cfg = preset_config(ctx)
    text_cfg = dataclasses.replace(cfg.text, pretrained="", weights="")
    device, batch = ctx.torch_device, _batch(ctx, cfg, "text")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_text_encoder(text_cfg).to(device)  # random weights: same speed
    prompts = [f"a red circle number {i} on the left, white background" for i in range(batch)]
    tokens = tokenize(prompts, cfg.text.context_length).to(device)
    with torch.device("meta"):
        flops = forward_flops(build_text_encoder(text_cfg, device="meta", load_weights=False),
                              torch.zeros(1, cfg.text.context_length, dtype=torch.long))
    info = {"encode": {"batch": batch, "input": f"{batch}x{cfg.text.context_length} tokens",
                       "params_m": count_params(encoder) / 1e6, "samples": batch,
                       "flops_per_sample": flops}}
    fns = {"encode": _forward(encoder, (tokens,), ctx)}
    if ctx.compile:
        fns["encode compiled"] = _forward(torch.compile(encoder, fullgraph=True), (tokens,), ctx)
        info["encode compiled"] = info["encode"]
    stats = core.time_alternating(fns, ctx=ctx, warmup=max(ctx.warmup, 2) if ctx.compile else None)
    return _rows("text", stats, info, ctx, {"encode compiled": "encode"} if ctx.compile else {})
