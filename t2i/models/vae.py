"""KL-regularised autoencoder (Kingma & Welling 2014; Rombach et al. 2022, sec. 3 and app. G).

The encoder maps x (B, 3, H, W) in [-1, 1] to the parameters of a diagonal Gaussian over latents
(B, z, H/f, W/f) with f = 2 ** (len(channel_mult) - 1); the decoder maps latents back to images.
`latent_scale` (1 / std of latents, measured after stage-1 training) is a persistent buffer so it
travels with the weights; diffusion runs on `z * latent_scale`. Activations inside are NHWC
(channels-last) unless `channels_last` is off; `encode` and `decode` return NCHW either way.
Three options, off by default, build Stable Diffusion's variant of the same network exactly
(`downsample_padding`, `attention_bias`, `post_quant_conv`; see t2i.models.vae_import).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2i.config import VAEConfig
from t2i.models.layers import (Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm,
                               memory_format)

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # as in LDM: keeps exp(logvar) finite in fp32


@dataclass(frozen=True)
class DiagonalGaussian:
    """q(z | x) = N(mean, diag(exp(logvar))), with mean and logvar (B, z, h, w)."""

    mean: torch.Tensor
    logvar: torch.Tensor

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> "DiagonalGaussian":
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, z, h, w)
        return cls(mean, torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None) -> torch.Tensor:
        """mean + std * eps with eps ~ N(0, I) drawn from `generator` (which must live on the
        tensors' device). None draws from torch's global generator: avoid it where results must
        reproduce."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                          dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) = 0.5 * sum(mean^2 + var - 1 - logvar) over latent dims -> (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


def middle_block(ch: int, groups: int, attend: bool, qkv_bias: bool) -> nn.Sequential:
    """ResBlock, single-head self-attention over all latent pixels (optional), ResBlock."""
    return nn.Sequential(ResBlock(ch, ch, groups, eps=1e-6),
                         SpatialSelfAttention(ch, groups, qkv_bias) if attend else nn.Identity(),
                         ResBlock(ch, ch, groups, eps=1e-6))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(ch, width, g, eps=1e-6))
                ch = width
            if level < len(widths) - 1:
                layers.append(Downsample(ch, asymmetric=cfg.downsample_padding == "asymmetric"))
        self.down = nn.Sequential(*layers)
        self.mid = middle_block(ch, g, cfg.mid_attention, cfg.attention_bias)
        self.norm_out = group_norm(ch, g, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2z, h, w): mean and logvar


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        g = cfg.norm_groups
        ch = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, ch, 3, padding=1)
        self.mid = middle_block(ch, g, cfg.mid_attention, cfg.attention_bias)
        layers: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResBlock(ch, widths[level], g, eps=1e-6))
                ch = widths[level]
            if level > 0:
                layers.append(Upsample(ch))
        self.up = nn.Sequential(*layers)
        self.norm_out = group_norm(ch, g, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)
        # SD's post_quant_conv; not folded into conv_in, which zero-pads its output: folded, its
        # bias would reach the border pixels through fewer taps than in SD (see vae_import)
        self.post_quant_conv = (nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
                                if cfg.post_quant_conv else nn.Identity())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.up(self.mid(self.conv_in(self.post_quant_conv(z))))
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """`encode(x) -> DiagonalGaussian`, `decode(z) -> x`. Latents are unscaled: multiply by
    `latent_scale` before diffusion and divide by it before `decode`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_scale", torch.tensor(1.0, dtype=torch.float32))

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        layout = memory_format(self.cfg.channels_last)
        moments = self.encoder(x.contiguous(memory_format=layout))
        return DiagonalGaussian.from_moments(moments.contiguous())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        layout = memory_format(self.cfg.channels_last)
        return self.decoder(z.contiguous(memory_format=layout)).contiguous()

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction from the reparameterised sample mean + std * eps, and the posterior."""
        posterior = self.encode(x)
        return self.decode(posterior.mean + posterior.std * eps), posterior
