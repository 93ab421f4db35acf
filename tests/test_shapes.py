"""The built-in shapes set: rendering, captions, held-out pairs, the analyzer, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2i.config import DataConfig
from t2i.data import DataError, ShapesSpec, build_loader, shapes
from t2i.rng import generator


def fake_tokenize(prompts: list[str]) -> torch.Tensor:
    out = torch.zeros(len(prompts), 77, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        out[i, 0] = len(prompt)
    return out


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_analyzer_recovers_every_attribute_of_random_renders(resolution):
    spec = ShapesSpec(resolution=resolution)
    wrong = []
    for n in range(8):
        images, _, attrs = shapes.sample_batch(spec, 64, generator(7, resolution, n))
        wrong += [(a, shapes.analyze(im)) for im, a in zip(images, attrs)
                  if shapes.analyze(im) != a]
    assert wrong == []


def test_analyzer_on_every_combination_at_the_size_extremes():
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            for position in shapes.POSITIONS:
                for background in shapes.BACKGROUNDS:
                    for size, jitter in ((0.35, (0.02, -0.02)), (0.55, (-0.02, 0.02))):
                        attrs = shapes.ShapeAttrs(colour, shape, position, background, size,
                                                  jitter)
                        image = shapes.render(attrs, 64)
                        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
                        assert shapes.analyze(image) == attrs, attrs
    # the float (3, H, W) layout of a batch reads the same
    chw = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    assert shapes.analyze(chw) == attrs


def test_renders_are_flat_with_antialiased_edges_and_the_shape_stays_inside():
    attrs = shapes.ShapeAttrs("purple", "circle", "left", "gray", size=0.55, jitter=(-0.02, 0))
    fg, bg = (np.asarray(c, np.float64) for c in (shapes.COLOURS["purple"], shapes.BACKGROUNDS["gray"]))
    hard = shapes.render_indices(*shapes._indices([attrs]),
                                 ShapesSpec(resolution=64, antialias=1))[0].numpy()
    assert {tuple(c) for c in hard.reshape(-1, 3)} == {tuple(fg.astype(int)), tuple(bg.astype(int))}
    image = shapes.render(attrs, 64)
    pixels = image.reshape(-1, 3).astype(np.float64)
    share = (pixels - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))  # every pixel on the bg-fg line
    np.testing.assert_allclose(pixels, bg + share[:, None] * (fg - bg), atol=0.9)
    assert 0 < ((share > 0.02) & (share < 0.98)).sum() < 0.2 * len(share)  # a thin edge ring
    # coverage keeps the area: pi r^2 of the circle in pixels, within rounding
    np.testing.assert_allclose(share.sum(), np.pi * (0.55 * 64 / 2) ** 2, rtol=0.01)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    assert {tuple(c) for c in border} == {tuple(bg.astype(int))}


def test_held_out_pairs_never_appear_in_training_batches():
    spec = ShapesSpec()
    seen = set()
    for n in range(30):
        _, prompts, attrs = shapes.sample_batch(spec, 64, generator(0, n))
        seen |= {(a.colour, a.shape) for a in attrs}
    assert seen == set(spec.training_pairs()) and not seen & set(shapes.HELD_OUT)
    colours_held = {c for c, _ in shapes.HELD_OUT}
    shapes_held = {s for _, s in shapes.HELD_OUT}
    assert colours_held <= {c for c, _ in seen} and shapes_held <= {s for _, s in seen}


def test_captions_name_every_attribute_in_varied_orders():
    attrs = shapes.ShapeAttrs("orange", "triangle", "bottom", "black")
    captions = [shapes.caption(attrs, i) for i in range(len(shapes.TEMPLATES))]
    assert len(set(captions)) == len(captions)
    for text in captions:
        assert "orange" in text and "triangle" in text and "bottom" in text
        assert " a orange" not in f" {text}"
    first_word = {text.split()[0] for text in captions}
    assert len(first_word) >= 4  # not one fixed sentence
    g = generator(0, "caption")
    assert {shapes.caption(attrs, g) for _ in range(50)} == set(captions)


def test_eval_prompts_cover_seen_and_held_out_pairs():
    held = shapes.eval_cases(seen=False, n=8)
    assert {(a.colour, a.shape) for _, a in held} == set(shapes.HELD_OUT)
    seen = shapes.eval_cases(seen=True, n=14)
    assert {(a.colour, a.shape) for _, a in seen} == set(ShapesSpec().training_pairs())
    for prompt, attrs in held + seen:
        assert attrs.colour in prompt and attrs.background in prompt
    grid = shapes.grid_prompts()
    assert len(grid) == 8 and grid[4:] == shapes.eval_prompts(False, 4)


def test_shapes_loader_batches_are_deterministic_and_resume_exactly():
    cfg = DataConfig(source="shapes", resolution=64)
    make = lambda position=None: build_loader(cfg, batch_size=8, tokenize=fake_tokenize,
                                              seed=3, position=position)
    loader = make()
    it = iter(loader)
    first = [next(it) for _ in range(5)]
    batch = first[0]
    assert batch["image"].shape == (8, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["image"].min() == -1 or batch["image"].max() == 1
    assert batch["tokens"].shape == (8, 77) and batch["tokens"].dtype == torch.int64
    for image, prompt in zip(batch["image"], batch["prompt"]):
        found = shapes.analyze(image)
        assert found.colour in prompt and found.shape in prompt
    again = make()
    it2 = iter(again)
    for _ in range(2):
        next(it2)
    resumed = iter(make(again.position()))
    for expected in first[2:]:
        got = next(resumed)
        assert torch.equal(got["image"], expected["image"]) and got["prompt"] == expected["prompt"]
    assert loader.stats()["samples"] == 40 and loader.position()["batches"] == 5
    other_rank = next(iter(build_loader(cfg, batch_size=8, tokenize=fake_tokenize, seed=3,
                                        rank=1, world_size=2)))
    assert other_rank["prompt"] != batch["prompt"]


def test_shapes_refuse_horizontal_flip():
    with pytest.raises(DataError, match="hflip"):
        build_loader(DataConfig(source="shapes", hflip=True), batch_size=2,
                     tokenize=fake_tokenize, seed=0)
