"""Parameter counts and forward FLOPs per sample of a config's three networks.

Models are built on the `meta` device (no memory, no weights) and one batch-1 forward is run under
`torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per multiply-add of matmuls,
convolutions and attention (norms and pointwise ops are not counted). A training step costs about
3x the forward (backward = 2x forward).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from t2i.config import Config


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def forward_flops(fn, *args) -> int:
    """FLOPs of `fn(*args)` as counted by FlopCounterMode (works on meta tensors)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def summarize(cfg: Config) -> list[dict]:
    """One row per network: model, params, GFLOPs per sample (forward) at cfg.data.resolution,
    and the input shape it was counted at."""
    from t2i.models.text import build_text_encoder
    from t2i.models.unet import UNet
    from t2i.models.vae import VAE

    res, f = cfg.data.resolution, cfg.vae.downsample_factor
    lat = (cfg.vae.z_channels, res // f, res // f)
    length = cfg.text.context_length
    meta = torch.device("meta")
    with meta:
        vae = VAE(cfg.vae)
        unet = UNet(cfg.unet)
    text = build_text_encoder(cfg.text, device=meta, load_weights=False)
    image = torch.zeros(1, cfg.vae.in_channels, res, res, device=meta)
    z = torch.zeros(1, *lat, device=meta)
    tokens = torch.zeros(1, length, dtype=torch.long, device=meta)
    context = torch.zeros(1, length, cfg.unet.context_dim, device=meta)
    t = torch.zeros(1, device=meta)
    vae_enc = forward_flops(lambda x: vae.encode(x).mean, image)
    vae_dec = forward_flops(vae.decode, z)
    rows = [
        {"model": "vae.encode", "params": count_params(vae.encoder),
         "gflops_per_sample": vae_enc / 1e9, "input": "x".join(map(str, image.shape[1:]))},
        {"model": "vae.decode", "params": count_params(vae.decoder),
         "gflops_per_sample": vae_dec / 1e9, "input": "x".join(map(str, lat))},
        {"model": "unet", "params": count_params(unet),
         "gflops_per_sample": forward_flops(unet, z, t, context) / 1e9,
         "input": "x".join(map(str, lat)) + f" + {length}x{cfg.unet.context_dim}"},
        {"model": "text", "params": count_params(text),
         "gflops_per_sample": forward_flops(text, tokens) / 1e9, "input": f"{length} tokens"},
    ]
    return rows


def format_summary(rows: list[dict]) -> str:
    """Fixed-width table (params in millions, forward GFLOPs per sample, train ~3x)."""
    lines = [f"{'model':<11} {'params':>10} {'GFLOPs/sample fwd':>18} {'~train':>9}  input",
             "-" * 70]
    for row in rows:
        gf = row["gflops_per_sample"]
        lines.append(f"{row['model']:<11} {row['params'] / 1e6:>9.2f}M {gf:>18.3f} {3 * gf:>9.3f}"
                     f"  {row['input']}")
    return "\n".join(lines)
