"""Latent denoiser: a UNet with sinusoidal timestep embedding and cross-attention to text states
(Ronneberger et al. 2015; Ho et al. 2020; Rombach et al. 2022, sec. 3.3 and app. E).

Level i has `num_res_blocks` residual blocks of width base_channels * channel_mult[i], each
followed by a SpatialTransformer where attention_levels[i]; every level but the last ends in a
stride-2 downsample. The middle is ResBlock, SpatialTransformer, ResBlock. The up path mirrors
the down path with one extra block per level, each block taking one skip connection. The output
convolution is zero-initialised, so an untrained model predicts zeros. Activations are NHWC
(channels-last) unless `channels_last` is off; the output is NCHW either way.

With `coord_channels`, two channels holding each pixel's x and y in (-1, 1) are appended to the
input (CoordConv, Liu et al. 2018): absolute position then reaches every layer directly instead
of being inferred from zero padding, which a small model learns slowly ("a circle on the left").
With `context_pool`, an MLP of the mean text state is added to the timestep embedding (as
Imagen and SDXL add a pooled text embedding), so every ResBlock, also at levels without
attention, sees the whole prompt; its last layer is zero-initialised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from t2i.config import UNetConfig, check_unet
from t2i.models.layers import (Downsample, ResBlock, SpatialTransformer, Upsample, group_norm,
                               maybe_checkpoint, memory_format, timestep_embedding, zero_init)


def coordinates(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) pixel-centre coordinates of x's grid in (-1, 1): channel 0 is x (left to
    right), channel 1 is y (top to bottom)."""
    b, _, h, w = x.shape
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h * 2 - 1  # (H,)
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w * 2 - 1  # (W,)
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])  # (2, H, W)
    return grid[None].expand(b, 2, h, w)


def pooled_context(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D) text states -> (B, D) mean over the attended tokens (all when mask is None)."""
    if mask is None:
        return context.mean(dim=1)
    weights = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


class UNetBlock(nn.Module):
    """One ResBlock, then an optional SpatialTransformer: the unit of gradient checkpointing."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, time_dim: int, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, cfg.norm_groups, time_dim)
        self.attn = (SpatialTransformer(out_ch, cfg.num_heads, cfg.transformer_depth,
                                        cfg.context_dim, cfg.norm_groups, cfg.attention_positions)
                     if attend else None)

    def forward(self, x: torch.Tensor, time_act: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, time_act)
        return self.attn(x, context, context_mask) if self.attn is not None else x


class UNet(nn.Module):
    """`forward(x, t, context, context_mask=None) -> prediction` (same shape as x).

    x (B, in_channels, h, w) with h, w divisible by 2 ** (levels - 1); t (B,) int or float
    timesteps (a 0-d t is broadcast); context (B, L, context_dim) text states; context_mask (B, L)
    bool, True = attend to that token (None attends to all)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_unet(cfg)  # the same check as config validation (a ConfigError, a ValueError)
        self.cfg = cfg
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        time_dim = cfg.base_channels * cfg.time_embed_mult
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, time_dim), nn.SiLU(),
                                      nn.Linear(time_dim, time_dim))
        self.context_mlp = (nn.Sequential(nn.Linear(cfg.context_dim, time_dim), nn.SiLU(),
                                          zero_init(nn.Linear(time_dim, time_dim)))
                            if cfg.context_pool else None)
        in_ch = cfg.in_channels + (2 if cfg.coord_channels else 0)
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)

        self.down_blocks, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        skip_widths, ch = [widths[0]], widths[0]
        for level, (width, attend) in enumerate(zip(widths, cfg.attention_levels)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(UNetBlock(ch, width, cfg, time_dim, attend))
                ch = width
                skip_widths.append(ch)
            self.down_blocks.append(blocks)
            if level < len(widths) - 1:
                self.downsamplers.append(Downsample(ch))
                skip_widths.append(ch)

        self.mid_block = UNetBlock(ch, ch, cfg, time_dim, attend=True)
        self.mid_res = ResBlock(ch, ch, cfg.norm_groups, time_dim)

        self.up_blocks, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(UNetBlock(ch + skip_widths.pop(), widths[level], cfg, time_dim,
                                        cfg.attention_levels[level]))
                ch = widths[level]
            self.up_blocks.append(blocks)
            if level > 0:
                self.upsamplers.append(Upsample(ch))

        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def _block(self, block: nn.Module, x: torch.Tensor, time_act: torch.Tensor,
               context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        return maybe_checkpoint(block, x, time_act, context, context_mask,
                                enabled=self.cfg.gradient_checkpointing)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        emb = timestep_embedding(t, cfg.base_channels, flip_sin_to_cos=cfg.flip_sin_to_cos,
                                 freq_shift=cfg.freq_shift).to(x.dtype)  # (B, C0)
        cond = self.time_mlp(emb)  # (B, time_dim)
        if self.context_mlp is not None:
            cond = cond + self.context_mlp(pooled_context(context, context_mask))
        time_act = F.silu(cond)  # (B, time_dim), activated once for all ResBlocks

        # cfg.channels_last: NHWC activations, which oneDNN (CPU) and cuDNN convolutions may run
        # faster, and the token reshapes in SpatialTransformer become views; False: NCHW
        # throughout. Values agree up to float rounding.
        if cfg.coord_channels:
            x = torch.cat([x, coordinates(x)], dim=1)  # (B, C + 2, H, W)
        h = self.conv_in(x.contiguous(memory_format=memory_format(cfg.channels_last)))
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = self._block(block, h, time_act, context, context_mask)
                skips.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                skips.append(h)

        h = self._block(self.mid_block, h, time_act, context, context_mask)
        h = self.mid_res(h, time_act)

        for level, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
                h = self._block(block, h, time_act, context, context_mask)
            if level < len(self.upsamplers):
                h = self.upsamplers[level](h)

        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous()  # back to NCHW for callers that reshape with .view
