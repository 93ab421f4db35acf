"""`load_image` and the training decode share one set of rules: the bit depth comes from the
image mode, EXIF orientation is applied, decompression bombs and damaged files are refused
with a one-line DataError naming the file (BadSample("corrupt_image") in the loader)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from t2i.data import BadSample, DataError
from t2i.data.transforms import load_image, open_image
from helpers import encode

RED, BLUE = (255, 0, 0), (0, 0, 255)


def pixels(data: bytes) -> np.ndarray:
    image = load_image(data)
    assert image.mode == "RGB"
    return np.asarray(image)


def sixteen_bit_ramp() -> np.ndarray:
    """(8, 8) uint16: a dark ramp 0..200 of 65535, plus one white and one mid-grey pixel."""
    ramp = (np.arange(64).reshape(8, 8) * 200 // 63).astype(np.uint16)
    ramp[0, 0], ramp[0, 1] = 65535, 257 * 100
    return ramp


def png_header(width: int, height: int) -> bytes:
    """A valid PNG header of a huge 8-bit RGB image with one tiny IDAT: 60 bytes."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------
# Bit depth from the mode


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16B", "TIFF"), ("I;16", "TIFF")])
def test_sixteen_bit_grey_is_scaled_by_its_mode_not_its_peak(mode, fmt):
    ramp = sixteen_bit_ramp()
    image = Image.frombytes(mode, (8, 8), ramp.astype(">u2" if mode.endswith("B") else "<u2")
                            .tobytes())
    out = pixels(encode(image, fmt))
    assert out.shape == (8, 8, 3) and (out[..., 0] == out[..., 2]).all()
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 100  # 65535 -> 255, 25700 -> 100
    dark = out[..., 0].ravel()[2:]
    assert dark.max() == 1 and dark.min() == 0  # 0..200 of 65535 stays black, not 0..200


def test_thirty_two_bit_int_reads_as_sixteen_bit_and_float_as_unit_range():
    ints = sixteen_bit_ramp().astype(np.int32)
    out = pixels(encode(Image.fromarray(ints, "I"), "TIFF"))
    assert out[0, 0, 0] == 255 and out[0, 1, 0] == 100 and out[..., 0].ravel()[2:].max() == 1
    floats = np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)
    out = pixels(encode(Image.fromarray(floats, "F"), "TIFF"))
    assert out[0, :, 0].tolist() == [0, 128, 255, 255]  # [0, 1] -> [0, 255], clipped


def test_sixteen_bit_png_through_the_training_decode_equals_load_image():
    data = encode(Image.fromarray(np.tile(sixteen_bit_ramp(), (4, 4))), "PNG")  # 32x32
    image, converted = open_image(data, 32)
    assert converted == "I;16"
    assert np.array_equal(np.asarray(image), pixels(data))


def test_transparency_is_composited_on_white():
    la = Image.fromarray(np.array([[[40, 0], [40, 255]]], np.uint8), "LA")
    assert pixels(encode(la, "PNG"))[0, :, 0].tolist() == [255, 40]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    out = pixels(encode(palette, "PNG", transparency=0))  # index 0 transparent
    assert out[0].tolist() == [[255, 255, 255], [10, 20, 30]]
    rgb = Image.new("RGB", (2, 1), (7, 8, 9))
    rgb.putpixel((1, 0), (1, 2, 3))
    assert pixels(encode(rgb, "PNG", transparency=(7, 8, 9)))[0].tolist() == [
        [255, 255, 255], [1, 2, 3]]


def test_cmyk_jpeg_becomes_rgb():
    out = pixels(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert out.shape == (16, 16, 3) and out[8, 8, 0] > 240 and out[8, 8, 1:].max() < 15


# ----------------------------------------------------------------------------------------------
# EXIF orientation


def marked(width: int = 40, height: int = 20) -> Image.Image:
    """Blue with a red 6x6 block in the stored top-left corner."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, 6, 6))
    return image


def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8))


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))


# orientation -> where the stored top-left corner is shown, and whether the sides swap
CORNERS = {1: ("top", "left", False), 2: ("top", "right", False), 3: ("bottom", "right", False),
           4: ("bottom", "left", False), 5: ("top", "left", True), 6: ("top", "right", True),
           7: ("bottom", "right", True), 8: ("bottom", "left", True)}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", sorted(CORNERS))
def test_exif_orientation_is_applied(orientation, fmt):
    out = pixels(with_orientation(marked(), fmt, orientation))
    vertical, horizontal, swapped = CORNERS[orientation]
    assert out.shape[:2] == ((40, 20) if swapped else (20, 40))
    row = 2 if vertical == "top" else out.shape[0] - 3
    col = 2 if horizontal == "left" else out.shape[1] - 3
    assert out[row, col, 0] > 200 and out[row, col, 2] < 60  # the red block is here
    red = (out[..., 0] > 200) & (out[..., 2] < 60)
    assert 25 <= red.sum() <= 45  # and nowhere else (6x6, JPEG edges)


def test_training_decode_turns_a_reduced_jpeg_upright_too():
    """160x80 stored, tagged 6: the loader drafts it (1/2 scale) and turns it to 40x80."""
    stored = Image.new("RGB", (160, 80), BLUE)
    stored.paste(RED, (0, 0, 80, 80))  # left half red: shown as the top half
    image, _ = open_image(with_orientation(stored, "JPEG", 6), 32)
    out = np.asarray(image)
    assert out.shape == (80, 40, 3)
    assert out[10, 20, 0] > 200 and out[70, 20, 2] > 200


# ----------------------------------------------------------------------------------------------
# Refused files: one line naming the file


def test_decompression_bomb_header_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(30000, 30000))
    with pytest.raises(DataError, match="huge.png") as err:
        load_image(path)
    assert "\n" not in str(err.value) and "pixels" in str(err.value)


def test_pixel_limit_is_pil_max_image_pixels_not_twice_it(monkeypatch):
    """PIL only warns between MAX_IMAGE_PIXELS and twice that; we refuse from the limit."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(encode(marked(30, 30), "PNG")).size == (30, 30)  # 900 pixels
    with pytest.raises(DataError, match=r"40x40 is more than 1000 pixels"):
        load_image(encode(marked(40, 40), "PNG"), name="big.png")  # 1600 < 2000
    with pytest.raises(BadSample, match="corrupt_image"):
        open_image(encode(marked(40, 40), "PNG"), 32)


@pytest.mark.parametrize("content", [
    lambda: encode(noise(), "PNG")[:3000],   # truncated PNG
    lambda: encode(noise(), "JPEG")[:1000],  # truncated JPEG
    lambda: b"just some notes, not an image\n",
    lambda: b"",
])
def test_damaged_or_non_image_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content())
    with pytest.raises(DataError) as err:
        load_image(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_file_folder_and_named_bytes(tmp_path):
    with pytest.raises(DataError, match="cannot read image .*missing.jpg"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(str(tmp_path))
    with pytest.raises(DataError, match="from-upload.jpg"):
        load_image(b"garbage", name="from-upload.jpg")
    assert load_image(encode(marked(), "PNG")).size == (40, 20)
