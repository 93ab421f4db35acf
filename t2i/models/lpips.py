"""LPIPS perceptual distance with a VGG16 backbone (Zhang et al. 2018, "The Unreasonable
Effectiveness of Deep Features as a Perceptual Metric", eq. 1; version 0.1 of their `lpips`
package), the perceptual term of LDM's autoencoder loss (Rombach et al. 2022, app. G).

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )

with f_l the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, each
normalised to unit length over channels, and w_l >= 0 the learned linear (1x1 conv) weights.
Inputs are images in [-1, 1], shifted and scaled per channel as the package does.

Weights come ONLY from a local file; t2i never downloads them. The file format
(`vae.lpips_weights`), a safetensors file written by `save_lpips_weights`:

    features.{i}.weight, features.{i}.bias   the 13 convolutions of torchvision's vgg16
                                             `features` (i = 0, 2, 5, 7, 10, 12, 14, 17, 19,
                                             21, 24, 26, 28), shapes as in torchvision
    lin{l}.weight                            (1, C_l, 1, 1), l = 0..4, C = 64, 128, 256, 512, 512
    metadata "format" = "t2i-lpips-vgg16-v0.1" (plus t2i's tensors_sha256 digest)

`convert_lpips_weights(sources, out)` makes that file from state dicts or files holding any of:
torchvision's ImageNet `vgg16` weights (`vgg16-397923af.pth`, keys `features.*`, the
`classifier.*` keys are dropped), the lpips package's linear weights
(`lpips/weights/v0.1/vgg.pth`, keys `lin{l}.model.1.weight`, shipped inside the pip wheel), or a
whole `lpips.LPIPS(net="vgg")` module's state dict (keys `net.slice{k}.{i}.*` and `lin*`).
This module never imports `lpips` or `torchvision`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from t2i.models.io import (WeightsError, check_compatible, load_weights, read_state_dict,
                          save_weights)

FORMAT = "t2i-lpips-vgg16-v0.1"
# torchvision's vgg16 `features` up to relu5_3: (out channels) for a 3x3 conv + ReLU, "M" for
# a 2x2 max-pool; indices follow torchvision's (a conv at i, its ReLU at i + 1).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# the package's ScalingLayer: (x - shift) / scale maps [-1, 1] images to ImageNet statistics
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # in the channel normalisation, as the package


def vgg16_features() -> nn.Sequential:
    """torchvision's vgg16 `features[:30]` (same module indices, so the same state-dict keys),
    with out-of-place ReLUs."""
    layers: list[nn.Module] = []
    ch = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(ch, int(item), 3, padding=1), nn.ReLU()]
            ch = int(item)
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """`lpips(x, y) -> (B,)` distances for images x, y (B, 3, H, W) in [-1, 1], H, W >= 16
    (relu5_3 is at 1/16 resolution). Frozen (requires_grad False, eval); gradients still flow
    to the inputs. Load weights with `load_lpips`."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features()
        for l, ch in enumerate(TAP_CHANNELS):
            self.add_module(f"lin{l}", nn.Conv2d(ch, 1, 1, bias=False))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five relu activations [(B, C_l, H / 2**l, W / 2**l)] of scaled images."""
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for l, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y))):
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)  # (B, C_l, h, w)
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            lin = getattr(self, f"lin{l}")
            total = total + lin((fx - fy).pow(2)).float().mean(dim=(1, 2, 3))  # (B,)
        return total


def lpips_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `state` this file format holds, under its keys: torchvision `features.*`
    keys as they are, the lpips module's `net.slice{k}.{i}.*` as `features.{i}.*`, the linear
    layers `lin{l}.model.1.weight` (or `lin{l}.weight`) as `lin{l}.weight`; everything else
    (the VGG classifier, the package's scaling buffers) is dropped."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "features" and len(parts) == 3:
            out[key] = value
        elif parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
            out[f"features.{parts[2]}.{parts[3]}"] = value
        elif parts[0].startswith("lin") and parts[-1] == "weight" and len(parts) in (2, 4):
            out[f"{parts[0]}.weight"] = value
    return out


def convert_lpips_weights(sources: Iterable[str | Path | dict[str, torch.Tensor]],
                          out: str | Path) -> Path:
    """Write the `vae.lpips_weights` file `out` from `sources`: state dicts, or `.pth` files
    (read with torch.load(weights_only=True)) / `.safetensors` files holding them (see the
    module docstring for the accepted keys). Later sources override earlier ones. Raises
    WeightsError naming the missing or mis-shaped keys when the sources do not hold all of
    the backbone and the five linear layers."""
    tensors: dict[str, torch.Tensor] = {}
    for source in sources:
        tensors.update(lpips_tensors(_read_state(source)))
    model = LPIPS()
    check_compatible(out, model.state_dict(), tensors, strict=True)
    return save_lpips_weights(out, tensors)


def save_lpips_weights(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_weights(path, {k: v.detach().float().contiguous() for k, v in tensors.items()},
                 {"format": FORMAT})
    return Path(path)


def load_lpips(path: str | Path) -> LPIPS:
    """The LPIPS network of a `vae.lpips_weights` file, frozen, on the CPU. Raises WeightsError
    naming the file when it is missing, damaged, of another format or holds other tensors,
    saying how to make one."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"vae.lpips_weights {str(path)!r}: no such file. {HOW_TO}")
    tensors, metadata = load_weights(path)
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"vae.lpips_weights {str(path)!r} is not a t2i LPIPS file (metadata "
                           f"format {metadata.get('format')!r}, expected {FORMAT!r}). {HOW_TO}")
    model = LPIPS()
    check_compatible(path, model.state_dict(), tensors, strict=True)
    model.load_state_dict(tensors)
    return model


HOW_TO = ("Make one offline with t2i.models.lpips.convert_lpips_weights([VGG16_PTH, "
          "LPIPS_VGG_PTH], OUT): VGG16_PTH = torchvision's vgg16-397923af.pth, LPIPS_VGG_PTH = "
          "lpips/weights/v0.1/vgg.pth from the lpips pip package (see docs/vae.md, 'LPIPS "
          "weights file')")


def _read_state(source: Any) -> dict[str, torch.Tensor]:
    """A state dict given as such, or read from a file by t2i.models.io (safetensors or a
    weights-only torch pickle; WeightsError naming the file otherwise)."""
    return source if isinstance(source, dict) else read_state_dict(source)
