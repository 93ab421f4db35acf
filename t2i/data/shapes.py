"""The built-in shapes set: one flat-filled shape per image, captioned from its attributes.

It lets a CPU learn text conditioning in minutes and lets us measure prompt adherence exactly:
`analyze` reads colour, shape, position and background back from pixels. Images are clean on
purpose (flat fills, no noise; edges anti-aliased by coverage, so their pixels vary smoothly
with the shape's sub-pixel position instead of in aliased steps): the demo VAE and UNet must
learn them in a few CPU minutes. Never flip them horizontally: left and right would swap
under the caption.

Some colour+shape pairs (`HELD_OUT`) never appear in training; prompts naming them measure
whether the model composes concepts it only saw separately.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (240, 210, 30), "purple": (140, 50, 190), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
}
# Each colour and each shape still appears in training with other partners.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"),
)
POSITION_OFFSETS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1),
                    "center": (0, 0)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Several orders so the text encoder must read the words, not slots in one sentence.
TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {colour} {shape} {where} on a {background} background",
    "{side}: a {colour} {shape} on a {background} background",
    "{colour} {shape}, {side}, {background} background",
    "a {background} background with a {colour} {shape} {where}",
    "{where}, a {shape} coloured {colour}",
    "a {shape} in {colour} {where}, {background} background",
    "{background} background, {colour} {shape} {where}",
)
EVAL_TEMPLATE = 1  # the template naming all four attributes


@dataclass(frozen=True)
class ShapeAttrs:
    """What one image shows. `size` (side of the shape's box / image side) and the small
    `jitter` of its centre are drawn for variety and ignored by comparisons."""

    colour: str
    shape: str
    position: str
    background: str
    size: float = field(default=0.45, compare=False)
    jitter: tuple[float, float] = field(default=(0.0, 0.0), compare=False)


@dataclass(frozen=True)
class ShapesSpec:
    """Geometry of the set (fractions of the image side)."""

    resolution: int = 64
    min_size: float = 0.35
    max_size: float = 0.55
    offset: float = 0.18  # centre distance from the middle for left/right/top/bottom
    jitter: float = 0.02  # uniform +-jitter of the centre; shapes keep >= 0.025 from the edge
    antialias: int = 4  # sub-pixels per side for edge coverage (1: hard, aliased edges)
    held_out: tuple[tuple[str, str], ...] = HELD_OUT

    def training_pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in self.held_out]


def caption(attrs: ShapeAttrs, rng: torch.Generator | int | None = None) -> str:
    """A caption of `attrs`: template drawn from `rng`, or template number `rng` if an int."""
    if isinstance(rng, int):
        index = rng % len(TEMPLATES)
    elif rng is None:
        index = EVAL_TEMPLATE
    else:
        index = int(torch.randint(len(TEMPLATES), (1,), generator=rng))
    text = TEMPLATES[index].format(colour=attrs.colour, shape=attrs.shape,
                                   where=POSITION_PHRASES[attrs.position], side=attrs.position,
                                   background=attrs.background)
    return re.sub(r"\ba (?=[aeiou])", "an ", text)  # "an orange square"


# ----------------------------------------------------------------------------------------------
# Rendering (vectorised over the batch: no per-pixel Python)
# ----------------------------------------------------------------------------------------------

_COLOUR_TABLE = np.array(list(COLOURS.values()), dtype=np.uint8)  # (6, 3)
_BACKGROUND_TABLE = np.array(list(BACKGROUNDS.values()), dtype=np.uint8)  # (3, 3)
_OFFSET_TABLE = np.array([POSITION_OFFSETS[p] for p in POSITIONS], dtype=np.float32)  # (5, 2)


def render_indices(colour: torch.Tensor, shape: torch.Tensor, position: torch.Tensor,
                   background: torch.Tensor, size: torch.Tensor, jitter: torch.Tensor,
                   spec: ShapesSpec) -> torch.Tensor:
    """Attribute indices (B,), size (B,), jitter (B, 2) -> (B, H, W, 3) uint8 images (a view
    of channel-planar memory, so the (B, 3, H, W) training layout is a free permute).
    A point is inside when: circle |d| <= s/2, square max|d| <= s/2, triangle (apex up, base s,
    height s) dy <= s/2 and |dx| <= (dy + s/2) / 2. Each pixel is the background blended with
    the shape colour by its coverage, the share of its spec.antialias^2 sub-pixel centres inside
    (antialias 1: hard edges from the pixel centre alone)."""
    res, k = spec.resolution, spec.antialias
    jit = jitter.numpy().astype(np.float32)
    centre = 0.5 + _OFFSET_TABLE[position.numpy()] * spec.offset + jit  # (B, 2) as (x, y)
    grid = ((np.arange(res * k) + 0.5) / (res * k)).astype(np.float32)  # sub-pixel centres
    dx = grid[None, None, :] - centre[:, 0, None, None]  # (B, 1, W*k)
    dy = grid[None, :, None] - centre[:, 1, None, None]  # (B, H*k, 1)
    half = (size.numpy().astype(np.float32) / 2)[:, None, None]  # (B, 1, 1)
    kind = shape.numpy()[:, None, None]
    inside = ((kind == 0) & (dx * dx + dy * dy <= half * half)
              | (kind == 1) & (np.abs(dx) <= half) & (np.abs(dy) <= half)
              | (kind == 2) & (dy <= half) & (np.abs(dx) <= (dy + half) / 2))  # (B, Hk, Wk)
    cover = inside.reshape(-1, res, k, res, k).mean(axis=(2, 4), dtype=np.float32)  # (B, H, W)
    fg = _COLOUR_TABLE[colour.numpy()].astype(np.float32)[:, :, None, None]  # (B, 3, 1, 1)
    bg = _BACKGROUND_TABLE[background.numpy()].astype(np.float32)[:, :, None, None]
    planar = np.rint(bg + cover[:, None] * (fg - bg)).astype(np.uint8)  # (B, 3, H, W)
    return torch.from_numpy(planar).permute(0, 2, 3, 1)  # (B, H, W, 3)


def _indices(attrs: list[ShapeAttrs]) -> tuple[torch.Tensor, ...]:
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    return (torch.tensor([colours.index(a.colour) for a in attrs]),
            torch.tensor([SHAPES.index(a.shape) for a in attrs]),
            torch.tensor([POSITIONS.index(a.position) for a in attrs]),
            torch.tensor([backgrounds.index(a.background) for a in attrs]),
            torch.tensor([a.size for a in attrs], dtype=torch.float32),
            torch.tensor([a.jitter for a in attrs], dtype=torch.float32).reshape(-1, 2))


def render_batch(attrs: list[ShapeAttrs], resolution: int = 64) -> torch.Tensor:
    """(B, H, W, 3) uint8."""
    return render_indices(*_indices(attrs), ShapesSpec(resolution=resolution))


def render(attrs: ShapeAttrs, resolution: int = 64) -> np.ndarray:
    """One (H, W, 3) uint8 image."""
    return np.ascontiguousarray(render_batch([attrs], resolution)[0].numpy())


def sample_batch(spec: ShapesSpec, batch_size: int, g: torch.Generator, rows: slice = slice(None)
                 ) -> tuple[torch.Tensor, list[str], list[ShapeAttrs]]:
    """Random training images (B, H, W, 3) uint8, their captions and attributes; never a
    held-out colour+shape pair. All `batch_size` rows are drawn, only `rows` are rendered (a
    rank renders its share of the global batch)."""
    pairs = spec.training_pairs()
    pair = torch.randint(len(pairs), (batch_size,), generator=g)
    position = torch.randint(len(POSITIONS), (batch_size,), generator=g)
    background = torch.randint(len(BACKGROUNDS), (batch_size,), generator=g)
    size = spec.min_size + (spec.max_size - spec.min_size) * torch.rand(batch_size, generator=g)
    jitter = (torch.rand(batch_size, 2, generator=g) * 2 - 1) * spec.jitter
    template = torch.randint(len(TEMPLATES), (batch_size,), generator=g)
    pair, position, background, size, jitter, template = (
        x[rows] for x in (pair, position, background, size, jitter, template))
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    colour = torch.tensor([colours.index(pairs[i][0]) for i in pair.tolist()])
    shape = torch.tensor([SHAPES.index(pairs[i][1]) for i in pair.tolist()])
    images = render_indices(colour, shape, position, background, size, jitter, spec)
    attrs = [ShapeAttrs(colours[c], SHAPES[s], POSITIONS[p], backgrounds[b], z, (jx, jy))
             for c, s, p, b, z, (jx, jy) in zip(colour.tolist(), shape.tolist(),
                                                position.tolist(), background.tolist(),
                                                size.tolist(), jitter.tolist())]
    prompts = [caption(a, t) for a, t in zip(attrs, template.tolist())]
    return images, prompts, attrs


# ----------------------------------------------------------------------------------------------
# Analysis: attributes back from pixels
# ----------------------------------------------------------------------------------------------


def _as_uint8(image: np.ndarray | torch.Tensor | Image.Image) -> np.ndarray:
    """PIL image, (H, W, 3) uint8, or (3, H, W) float in [-1, 1] -> (H, W, 3) uint8."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.dtype.is_floating_point:
            image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if image.shape[0] == 3 and image.shape[-1] != 3:
            image = image.permute(1, 2, 0)
        return image.numpy()
    return np.asarray(image, dtype=np.uint8)


def _nearest(rgb: np.ndarray, table: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(table)
    dist = np.linalg.norm(np.asarray(list(table.values()), np.float32) - rgb, axis=1)
    return names[int(dist.argmin())], float(dist.min())


def _coverage(pixels: np.ndarray, bg: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W) share of the shape colour in each pixel: the projection of the pixel
    onto the background-to-colour line, clipped to [0, 1], and 0 where the pixel is far (> 60)
    from that line (another colour). An anti-aliased or slightly blurred edge keeps the
    shape's area and its 50% extent, so the fill ratio below measures geometry, not sharpness."""
    axis = fg - bg
    share = np.clip((pixels - bg) @ axis / float(axis @ axis), 0.0, 1.0)  # (H, W)
    off_line = np.linalg.norm(pixels - (bg + share[..., None] * axis), axis=-1)
    return np.where(off_line <= 60, share, 0.0)


def _shape_of(box: np.ndarray) -> str:
    """Coverage (h, w) of the shape's box -> circle | square | triangle, by fill and taper."""
    fill = float(box.sum()) / float(box.max(axis=0).sum() * box.max(axis=1).sum())
    half = box.shape[0] // 2  # rows above / below the middle (an odd box's middle row is out)
    taper = float(box[:half].sum()) / max(float(box[box.shape[0] - half:].sum()), 1e-6)
    return "triangle" if fill < 0.64 or taper < 0.6 else "square" if fill > 0.9 else "circle"


def analyze(image: np.ndarray | torch.Tensor | Image.Image) -> ShapeAttrs:
    """Recover (colour, shape, position, background) from pixels.
    Background: median of the border. Colour: nearest palette entry to the median of pixels far
    from the background. Shape: the shape's area (summed coverage, `_coverage`) over the
    area of its box, whose width and height are summed column and row maxima of the coverage
    (sub-pixel exact for straight edges): square 1, circle pi/4, triangle 1/2; a triangle (apex
    up) is also told by its taper, the coverage of the box's upper half over its lower half
    (1/3, against 1 for circle and square), which holds for a blunted apex too. Position: box
    centre against the middle. 'none' fields when no shape is found (used on generated
    images)."""
    pixels = _as_uint8(image).astype(np.float32)  # (H, W, 3)
    height, width = pixels.shape[:2]
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background, _ = _nearest(np.median(border, axis=0), BACKGROUNDS)
    bg_rgb = np.asarray(BACKGROUNDS[background], np.float32)
    far = np.linalg.norm(pixels - bg_rgb, axis=-1) > 60  # (H, W)
    if far.sum() < 4:
        return ShapeAttrs("none", "none", "none", background)
    colour, _ = _nearest(np.median(pixels[far], axis=0), COLOURS)
    cover = _coverage(pixels, bg_rgb, np.asarray(COLOURS[colour], np.float32))  # (H, W)
    ys, xs = np.nonzero(cover >= 0.5)
    if len(ys) < 4:
        return ShapeAttrs(colour, "none", "none", background)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape = _shape_of(cover[top:bottom, left:right])
    ox = (left + right) / 2 / width - 0.5
    oy = (top + bottom) / 2 / height - 0.5
    if max(abs(ox), abs(oy)) < 0.1:
        position = "center"
    elif abs(ox) >= abs(oy):
        position = "left" if ox < 0 else "right"
    else:
        position = "top" if oy < 0 else "bottom"
    return ShapeAttrs(colour, shape, position, background,
                      size=max(bottom - top, right - left) / max(height, width))


# ----------------------------------------------------------------------------------------------
# Evaluation prompts
# ----------------------------------------------------------------------------------------------


def eval_cases(seen: bool, n: int, spec: ShapesSpec = ShapesSpec()) -> list[tuple[str, ShapeAttrs]]:
    """`n` deterministic (prompt, target attributes) pairs covering training pairs (`seen`) or
    the held-out pairs, cycling positions and backgrounds, captioned with all four attributes."""
    pairs = spec.training_pairs() if seen else list(spec.held_out)
    cases = []
    for i in range(n):
        colour, shape = pairs[i % len(pairs)]
        attrs = ShapeAttrs(colour, shape, POSITIONS[(i // len(pairs) + i) % len(POSITIONS)],
                           list(BACKGROUNDS)[(i // len(pairs) + 2 * i) % len(BACKGROUNDS)])
        cases.append((caption(attrs, EVAL_TEMPLATE), attrs))
    return cases


def eval_prompts(seen: bool, n: int) -> list[str]:
    return [prompt for prompt, _ in eval_cases(seen, n)]


def grid_prompts(seen: int = 4, held_out: int = 4) -> list[str]:
    """Prompts for training sample grids: seen combinations first, then held-out ones."""
    return eval_prompts(True, seen) + eval_prompts(False, held_out)


def score(target: ShapeAttrs, found: ShapeAttrs) -> dict[str, bool]:
    """Per-attribute agreement plus `all`."""
    result = {name: getattr(target, name) == getattr(found, name)
              for name in ("colour", "shape", "position", "background")}
    result["all"] = all(result.values())
    return result
