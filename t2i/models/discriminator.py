"""PatchGAN discriminator for stage-1 adversarial training (Isola et al. 2017, "Image-to-Image
Translation with Conditional Adversarial Networks" (pix2pix), sec. 3.2.2 and app. 6.1.2; used
by Esser et al. 2021 (VQGAN) and Rombach et al. 2022 (LDM) on their autoencoders).

The network is a stack of 4x4 convolutions: `layers` of stride 2 (the first without a norm),
one of stride 1, and a final 4x4 convolution to one logit per patch. Each logit sees a
`receptive_field(layers)` pixel square of the image (70 for layers=3, the "70x70 PatchGAN").

Deviation from LDM's NLayerDiscriminator: GroupNorm instead of BatchNorm. BatchNorm normalises
with the statistics of the batch it sees, so the logits of one image would depend on how the
global batch is split over torchrun ranks and gradient-accumulation micro-batches (a 2-process
run would no longer equal one process with the doubled batch), and its running statistics are
buffers changed in place by every forward (DDP would broadcast them from rank 0 each step).
GroupNorm normalises each image on its own: no batch dependence and no buffers (its
statistics still let every logit depend a little on the whole image, as BatchNorm's on the
whole batch; through the convolutions alone a logit sees its patch).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def disc_widths(channels: int, layers: int) -> list[int]:
    """Output widths of the convolutions before the last one: channels * min(2**n, 8)."""
    return [channels * min(2 ** n, 8) for n in range(layers + 1)]


def receptive_field(layers: int) -> int:
    """Side, in pixels, of the image square one output logit depends on."""
    size = 1
    strides = [2] * layers + [1, 1]  # the stride-2 convolutions, then two of stride 1
    for stride in reversed(strides):
        size = (size - 1) * stride + 4
    return size


def output_size(size: int, layers: int) -> int:
    """Logit-map side for an input side `size`: halved `layers` times, then minus 1 twice."""
    for _ in range(layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2


class PatchDiscriminator(nn.Module):
    """x (B, 3, H, W) in [-1, 1] -> real/fake logits (B, 1, h, w), h = H / 2**layers - 2
    (see `output_size`); each logit judges one receptive_field(layers)-pixel patch.

    Init as in pix2pix / LDM (`weights_init`): convolution weights N(0, 0.02), norm scales
    N(1, 0.02), biases 0, drawn from torch's global generator (build it inside `rng.seeded`)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3,
                 norm_groups: int = 32):
        super().__init__()
        widths = disc_widths(channels, layers)
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1  # the last of these keeps the resolution (- 1)
            blocks += [nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1,
                                 bias=False),
                       nn.GroupNorm(math.gcd(norm_groups, widths[n]), widths[n]),
                       nn.LeakyReLU(0.2)]
        blocks.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w)


@torch.no_grad()
def weights_init(module: nn.Module) -> None:
    """pix2pix's DCGAN-style init (Radford et al. 2016): conv weights N(0, 0.02), norm scales
    N(1, 0.02), biases zero. In place on `module`'s own parameters."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
