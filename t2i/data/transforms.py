"""Image bytes -> one square uint8 training image: reduced-scale JPEG decode, mode repair,
crop and resize in one resampling pass, optional horizontal flip. Also `load_image`, the one
way t2i opens a user's image (training shards, `t2i-data pack` and `inspect`, `--init-image`),
so that every path applies the same rules:

- upright: the EXIF orientation tag is applied (a phone photo tagged 6 is turned);
- 8-bit RGB, the bit depth taken from the image mode, never from the pixel values: 16-bit
  grey (I;16, I;16B, ...) and I are divided by 257 (65535 -> 255, 200 -> 1), F is read as
  [0, 1]; alpha and palette transparency are composited on white; CMYK, YCbCr, LAB, 1, L, P
  use PIL's conversion;
- at most `PIL.Image.MAX_IMAGE_PIXELS` pixels, checked on the header before any pixel is
  allocated (a decompression bomb is refused, not decoded).

Decoding is the cost of the data pipeline. A JPEG stores 8x8 DCT blocks, so libjpeg can
decode directly at 1/2, 1/4 or 1/8 scale for a fraction of the work (PIL `draft`). We ask for
the smallest scale whose shorter side still covers the training resolution, e.g. a 512x512
JPEG for a 256 run decodes at 256x256 and needs no resize at all.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

from t2i.data.errors import BadSample, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_ASPECT = 4.0
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # I: what PIL gives 16-bit files
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """A user's image file (a path, or its bytes) as upright 8-bit RGB at full size, by the
    rules in the module docstring. `name` is what messages call it (default: the path).
    Raises DataError with one line naming the file when it cannot be read, is not an image,
    is truncated, or has more than PIL.Image.MAX_IMAGE_PIXELS pixels."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or "(image bytes)"
    else:
        name = name or str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image {name}: {err.strerror or err}") from None
    try:
        return decode(open_header(data))[0]
    except BadSample as bad:
        raise DataError(f"cannot use image {name}: {bad.detail}") from None


def open_header(data: bytes) -> Image.Image:
    """Parse the image header only (no pixels are decoded or allocated).
    Raises BadSample("corrupt_image") for bytes that are no image PIL knows and for more than
    PIL.Image.MAX_IMAGE_PIXELS pixels (PIL itself only warns below twice that)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise BadSample("corrupt_image", f"too many pixels, refused unread ({err})") from None
    except Image.UnidentifiedImageError:
        raise BadSample("corrupt_image", "not an image format PIL reads") from None
    except Exception as err:  # decoders raise many types on hostile bytes
        raise BadSample("corrupt_image", f"not an image ({type(err).__name__}: {err})") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        raise BadSample("corrupt_image", f"{image.width}x{image.height} is more than "
                        f"{limit} pixels (PIL.Image.MAX_IMAGE_PIXELS): refused unread")
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1..8; 1, the upright default, when absent or unreadable)."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block: the pixels may still be fine
        return 1
    return value if value in range(1, 9) else 1


def decode(image: Image.Image, min_side: int | None = None) -> tuple[Image.Image, str | None]:
    """Decode an image from `open_header` to upright 8-bit RGB. With `min_side`, a JPEG
    decodes at the smallest DCT scale whose shorter side still covers it. Returns (image,
    the original mode when it had to be converted, else None).
    Raises BadSample("corrupt_image") when the pixels do not decode (truncated, damaged)."""
    try:
        width, height = image.size
        short = min(width, height)
        if min_side and image.format == "JPEG" and short >= 2 * min_side:
            scale = min_side / short
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()  # a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
        if exif_orientation(image) != 1:  # (PNG keeps EXIF after the pixels: read it after load)
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except Exception as err:
        raise BadSample("corrupt_image", f"{type(err).__name__}: {err}") from None


def open_image(data: bytes, resolution: int) -> tuple[Image.Image, str | None]:
    """Decode `data` to an upright RGB PIL image whose shorter side is at least `resolution`
    where the source allows. Returns (image, original mode when it had to be converted, else
    None). Raises BadSample: corrupt_image, too_small, bad_aspect."""
    image = open_header(data)
    check_size(image.size, resolution)
    return decode(image, resolution)


def check_size(size: tuple[int, int], resolution: int) -> None:
    """Raises BadSample("too_small") when the shorter side is under a quarter of the training
    resolution, BadSample("bad_aspect") when the longer side is over MAX_ASPECT times it."""
    width, height = size
    short, long = min(width, height), max(width, height)
    if short < max(1, resolution // 4):
        raise BadSample("too_small", f"{width}x{height} for resolution {resolution}")
    if long > MAX_ASPECT * short:
        raise BadSample("bad_aspect", f"{width}x{height}")


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode to 8-bit RGB, the bit depth taken from the mode: 16-bit grey and I are
    divided by 257 and rounded, F is read as [0, 1]; alpha and transparency are composited on
    white (transparent pixels carry arbitrary colours); the rest use PIL's conversion."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image, None
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        values = values * 255.0 if mode == "F" else values / 257.0
        gray = np.clip(np.nan_to_num(np.rint(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB"), mode
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas, mode
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
