"""Building blocks shared by the VAE and the UNet.

Every block has a pure `forward` (no behaviour switched by `.training`, no dropout) and keeps the
memory format of its input (`memory_format`: the models' `channels_last` choice), except where a
kernel chooses its own (CUDA's GroupNorm returns NCHW). On NHWC-strided input the token reshapes
below are views, and the tensors they return are NHWC-strided again. All attention goes through
`F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint


def memory_format(channels_last: bool) -> torch.memory_format:
    """The activation layout a model config asks for: NHWC (`channels_last`) or NCHW. Values agree
    up to float rounding; which is faster depends on the device and its kernels
    (bench/gpu_check.sh measures both)."""
    return torch.channels_last if channels_last else torch.contiguous_format


def group_norm(channels: int, groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm with `groups` clipped so it always divides `channels` (reduced-width tests)."""
    groups = math.gcd(groups, channels)
    return nn.GroupNorm(groups, channels, eps=eps)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero all parameters so the block starts as the identity of its residual branch."""
    for param in module.parameters():
        nn.init.zeros_(param)
    return module


def maybe_checkpoint(fn: nn.Module, *args: torch.Tensor | None, enabled: bool) -> torch.Tensor:
    """Run `fn(*args)`, recomputing its activations in backward when `enabled`."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) int or float timesteps (Vaswani et al. 2017, sec. 3.5;
    Ho et al. 2020, app. B). With half = dim // 2 and k = 0..half-1:

        freq_k = exp(-ln(max_period) * k / (half - freq_shift)),   arg_k = t * freq_k
        out = [cos(arg), sin(arg)] if flip_sin_to_cos else [sin(arg), cos(arg)]

    (freq_shift=0 with flip=True is Stable Diffusion's convention.) An odd `dim` gets one zero
    column at the end. Computed in float32 whatever the autocast dtype."""
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))  # (half,)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    cos, sin = torch.cos(args), torch.sin(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice with a residual connection (He et al. 2016, as in DDPM/LDM).
    With `time_dim`, a projection of `time_act` = SiLU(time embedding), computed once by the
    caller for all blocks, is added between the two convs."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, time_dim: int | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups, eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = group_norm(out_ch, groups, eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, time_act: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        if self.time_proj is not None:
            h = h + self.time_proj(time_act)[:, :, None, None]  # (B, out, 1, 1) broadcast
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Downsample(nn.Module):
    """3x3 conv with stride 2. Symmetric padding 1, or with `asymmetric` zero padding (0,1,0,1)
    (right and bottom only) as LDM's and diffusers' VAEs; for even sizes the two differ by a
    one-pixel shift of the sampling grid."""

    def __init__(self, ch: int, asymmetric: bool = False):
        super().__init__()
        self.pad = (0, 1, 0, 1) if asymmetric else None
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)  # (B, C, H+1, W+1)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v via SDPA on (B, heads, N, d) tensors -> (B, N, heads*d).
    `key_mask` (B, L) bool, True = attend to that key."""
    mask = key_mask[:, None, None, :] if key_mask is not None else None  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
    return rearrange(out, "b h n d -> b n (h d)")


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection (one GEMM instead of three);
    `bias`: the projection has biases (LDM's and diffusers' VAE attention)."""

    def __init__(self, dim: int, heads: int, bias: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.out(attention(*qkv.unbind(0)))  # q, k, v: (B, h, N, d)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens to text states, fused KV projection."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, h, N, d)
        kv = rearrange(self.kv(context), "b l (two h d) -> two b h l d", two=2, h=self.heads)
        return self.out(attention(q, *kv.unbind(0), key_mask=context_mask))


class GEGLU(nn.Module):
    """Feed-forward with a GELU-gated linear unit (Shazeer 2020, eq. 6): W2 (a * GELU(g))."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner = dim * mult
        self.proj = nn.Linear(dim, 2 * inner)
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)  # 2 x (B, N, inner)
        return self.out(a * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward (LDM's
    BasicTransformerBlock)."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


def fourier_positions(h: int, w: int, dim: int, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(h*w, dim) fixed 2-D Fourier features of pixel-centre coordinates in (-1, 1), row-major:
    dim/4 frequencies f_k = 2 ** (4k / (dim/4) - 1) (0.5 to ~8; sin(pi x / 2) is monotonic
    across the image) per axis, each as [sin(pi f x), cos(pi f x)], x channels first.
    Coordinates are fractions of the image, so "left" means the same at every resolution.
    dim must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"position features need a width divisible by 4, got {dim}")
    n = dim // 4
    freqs = 2.0 ** (4.0 * torch.arange(n, device=device, dtype=torch.float64) / n - 1)  # (n,)
    ys = (torch.arange(h, device=device, dtype=torch.float64) + 0.5) / h * 2 - 1  # (h,)
    xs = (torch.arange(w, device=device, dtype=torch.float64) + 0.5) / w * 2 - 1  # (w,)

    def features(coord: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, 2n)
        arg = math.pi * coord[:, None] * freqs[None]
        return torch.cat([arg.sin(), arg.cos()], dim=-1)

    fx = features(xs)[None, :, :].expand(h, w, 2 * n)  # (h, w, 2n)
    fy = features(ys)[:, None, :].expand(h, w, 2 * n)
    return torch.cat([fx, fy], dim=-1).reshape(h * w, dim).to(dtype)


class SpatialTransformer(nn.Module):
    """GroupNorm, linear projection in, `depth` transformer blocks over the H*W tokens,
    zero-initialised projection out, residual (Rombach et al. 2022, sec. 3.3). With `positions`,
    fixed Fourier features of each token's place are added after the projection in, so queries
    know where they are and cross-attention can tie a word ("left") to a region directly."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int,
                 positions: bool = False):
        super().__init__()
        self.positions = positions
        self.norm = group_norm(ch, groups, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, context_dim, heads) for _ in range(depth))
        self.proj_out = zero_init(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C), a view if NHWC
        tokens = self.proj_in(tokens)
        if self.positions:
            tokens = tokens + fourier_positions(h, w, tokens.shape[-1], tokens.device, tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        tokens = self.proj_out(tokens)
        return x + rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w)  # NHWC-strided


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all pixels with a residual (the VAE's middle block);
    `qkv_bias` as SelfAttention's `bias`."""

    def __init__(self, ch: int, groups: int, qkv_bias: bool = False):
        super().__init__()
        self.norm = group_norm(ch, groups, eps=1e-6)
        self.attn = SelfAttention(ch, heads=1, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        tokens = rearrange(self.norm(x), "b c h w -> b (h w) c")  # (B, HW, C)
        return x + rearrange(self.attn(tokens), "b (h w) c -> b c h w", h=h, w=w)
