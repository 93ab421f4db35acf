"""Image bytes -> one square uint8 training image: reduced-scale JPEG decode, mode repair,
crop and resize in one resampling pass, optional horizontal flip.

Decoding is the cost of the data pipeline. A JPEG stores 8x8 DCT blocks, so libjpeg can
decode directly at 1/2, 1/4 or 1/8 scale for a fraction of the work (PIL `draft`). We ask for
the smallest scale whose shorter side still covers the training resolution, e.g. a 512x512
JPEG for a 256 run decodes at 256x256 and needs no resize at all.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from t2i.data.errors import BadSample

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_ASPECT = 4.0
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class Transform:
    """How a decoded image becomes a training image (`resolution` x `resolution` RGB)."""

    resolution: int
    crop: str = "center"  # center | random
    hflip: bool = False

    def __post_init__(self) -> None:
        if self.crop not in ("center", "random"):
            raise ValueError(f"data.crop must be 'center' or 'random', got {self.crop!r}")
        if self.resolution < 8:
            raise ValueError(f"data.resolution must be at least 8, got {self.resolution}")


def open_image(data: bytes, resolution: int) -> tuple[Image.Image, str | None]:
    """Decode `data` to an RGB PIL image whose shorter side is at least `resolution` where the
    source allows. Returns (image, original mode when it had to be converted, else None).
    Raises BadSample for bytes that do not decode or an unusable size."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        short, long = min(width, height), max(width, height)
        if short < max(1, resolution // 4):
            raise BadSample("too_small", f"{width}x{height} for resolution {resolution}")
        if long > MAX_ASPECT * short:
            raise BadSample("bad_aspect", f"{width}x{height}")
        if image.format == "JPEG" and short >= 2 * resolution:
            scale = resolution / short
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()  # a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
        if "exif" in image.info:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except BadSample:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as err:
        raise BadSample("corrupt_image", f"{type(err).__name__}: {err}") from None


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode to RGB: alpha is composited on white (transparent pixels carry arbitrary
    colours), 16-bit and float images are scaled to 8 bits, the rest use PIL's conversion."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas, mode
    if mode in _HIGH_BIT_MODES:
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max(initial=0) > 255 else 255.0
        gray = np.clip(values * (255.0 / peak), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), mode
    return image.convert("RGB"), mode  # L, 1, P, CMYK, YCbCr, LAB, HSV


def crop_resize(image: Image.Image, resolution: int, crop: str = "center",
                u: float = 0.5) -> Image.Image:
    """Square crop of the shorter side (centred, or at fraction `u` along the longer side for
    random crops) resized to `resolution` in one bicubic pass over the crop box only."""
    width, height = image.size
    side = min(width, height)
    frac = u if crop == "random" else 0.5
    left, top = round(frac * (width - side)), round(frac * (height - side))
    box = (left, top, left + side, top + side)
    if side == resolution:
        return image if (width, height) == (side, side) else image.crop(box)
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box)


def load_training_image(data: bytes, transform: Transform,
                        u: float = 0.5, flip: bool = False) -> tuple[np.ndarray, str | None]:
    """Bytes -> (H, W, 3) uint8 array at the training resolution, and the converted mode.
    `u` (random crop offset) and `flip` are drawn by the caller from the sample's own seed."""
    image, converted = open_image(data, transform.resolution)
    image = crop_resize(image, transform.resolution, transform.crop, u)
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    if transform.hflip and flip:
        array = array[:, ::-1]
    return array, converted


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.as_tensor(images)
    x = x.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1.0)
