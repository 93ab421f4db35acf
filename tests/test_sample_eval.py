"""Sampling and evaluation end to end on a micro model trained for a few steps: shapes, value
ranges, bitwise determinism, guidance 1 == the conditional-only loop, negative prompts, img2img
at strength 0 and 1, the shapes suite's accuracy on planted images, report schemas and CLI
errors. The model is random-ish; the tests check plumbing and contracts, not image quality."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2i import eval as metrics
from t2i import rng
from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli
from t2i.data import shapes
from t2i.models.text import tokenize
from t2i.sample import Generation, generate, init_sampler, load_pipeline, sampler_module
from t2i.schedulers import NoiseSchedule
from helpers import invoke

PROMPTS = ["a red circle on the left", "a blue square at the top on a black background",
           "a green triangle in the center"]


@pytest.fixture
def run_dir(f8_run) -> Path:
    """conftest's f8_run: 32x32 images, f8 VAE, the UNet checkpoint of step 3; read only."""
    return f8_run


@pytest.fixture(scope="module")
def pipe(f8_run):
    return load_pipeline(f8_run)


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(i) for i in images])  # (N, H, W, 3) uint8


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["pndm", "lms"])
def test_generate_shapes_ranges_and_seeds(pipe, sampler):
    out = generate(pipe, PROMPTS, sampler=sampler, steps=4, seed=7, batch_size=2)
    assert out.seeds == [7, 8, 9] and out.prompts == PROMPTS
    assert out.latents.shape == (3, 4, 4, 4) and torch.isfinite(out.latents).all()
    assert all(i.size == (32, 32) and i.mode == "RGB" for i in out.images)
    x = pixels(out.images)
    assert x.dtype == np.uint8 and x.std() > 0  # decoded, clamped to [-1, 1], not constant
    # Image i depends on seed + i only, not on which batch it landed in (noise drawn per image
    # on the CPU); batch size may change kernel rounding, so the comparison is close, not equal.
    alone = generate(pipe, PROMPTS[2:], sampler=sampler, steps=4, seed=9, batch_size=1)
    torch.testing.assert_close(alone.latents, out.latents[2:], rtol=1e-4, atol=1e-4)


def test_same_seed_is_bitwise_equal_and_other_seeds_differ(pipe):
    a, b = (generate(pipe, PROMPTS[:2], steps=4, seed=3) for _ in range(2))
    assert torch.equal(a.latents, b.latents)
    assert np.array_equal(pixels(a.images), pixels(b.images))
    c = generate(pipe, PROMPTS[:2], steps=4, seed=4)
    assert not torch.equal(a.latents, c.latents)


def test_precision_auto_is_fp32_on_cpu_and_bf16_stays_close(pipe):
    fp32 = generate(pipe, PROMPTS[:1], steps=3, seed=6, precision="fp32")
    auto = generate(pipe, PROMPTS[:1], steps=3, seed=6, precision="auto")
    assert torch.equal(fp32.latents, auto.latents)
    bf16 = generate(pipe, PROMPTS[:1], steps=3, seed=6, precision="bf16")
    assert bf16.latents.dtype == torch.float32  # the scheduler state stays fp32
    assert not torch.equal(bf16.latents, fp32.latents)  # autocast really ran
    assert (bf16.latents - fp32.latents).abs().mean() < 0.05 * fp32.latents.abs().mean()


def loop_by_hand(pipe, sampler: str, steps: int, seed: int, prompt: str, negative: str,
                 guidance: float) -> torch.Tensor:
    """The reverse process written out independently of `t2i.sample.denoise`: noise from
    `seed`, the sampler's own step, separate (unbatched) UNet calls for the conditional and
    unconditional halves, guidance u + g (c - u) only when g != 1."""
    noise = torch.randn((4, 4, 4), generator=rng.generator(seed))[None]  # (1, C, h, w)
    module = sampler_module(sampler)
    state = init_sampler(pipe, sampler, steps, 1.0, noise.shape)
    cond, uncond = (pipe.text(tokenize([text], pipe.text.context_length))[0]
                    for text in (prompt, negative))  # (1, L, D)
    x = noise * state.init_noise_sigma
    with torch.no_grad():
        for t in state.timesteps:
            x_in = module.scale_model_input(state, x)
            eps = pipe.unet(x_in, t.expand(1), cond)
            if guidance != 1.0:
                eps_u = pipe.unet(x_in, t.expand(1), uncond)
                eps = eps_u + guidance * (eps - eps_u)
            x, state = module.step(state, eps, x)
    return x  # (1, C, h, w)


@pytest.mark.parametrize("sampler", ["pndm", "lms"])
def test_guidance_one_is_the_conditional_only_loop(pipe, sampler):
    got = generate(pipe, PROMPTS[:1], sampler=sampler, steps=5, guidance=1.0, seed=5,
                   negative="ignored when guidance is 1")
    expected = loop_by_hand(pipe, sampler, 5, 5, PROMPTS[0], "anything", 1.0)
    assert torch.equal(got.latents, expected)


def test_guided_sampling_matches_the_loop_by_hand(pipe):
    """u + g (c - u) with the negative prompt as u; the batched call rounds differently from
    separate calls (~1e-8), far below the effect of guidance itself (~1e-4 here)."""
    got = generate(pipe, PROMPTS[:1], steps=5, guidance=3.0, seed=5, negative="a yellow square")
    expected = loop_by_hand(pipe, "pndm", 5, 5, PROMPTS[0], "a yellow square", 3.0)
    assert (got.latents - expected).abs().mean() < 5e-7
    for other in (loop_by_hand(pipe, "pndm", 5, 5, PROMPTS[0], "a yellow square", 1.0),
                  loop_by_hand(pipe, "pndm", 5, 5, "a yellow square", PROMPTS[0], 3.0),  # swapped
                  loop_by_hand(pipe, "pndm", 5, 5, PROMPTS[0], "", 3.0)):
        assert (got.latents - other).abs().mean() > 2e-6


def test_negative_prompt_changes_the_result(pipe):
    """The micro model's text dependence is weak (~1e-4 in latents) but far above rounding
    (~1e-8), and generation is bitwise deterministic, so any change comes from the prompt."""
    base = generate(pipe, PROMPTS[:2], steps=4, guidance=5.0, seed=1)
    neg = generate(pipe, PROMPTS[:2], steps=4, guidance=5.0, seed=1, negative="a yellow square")
    assert (base.latents - neg.latents).abs().mean() > 2e-6
    # The negative prompt is the unconditional half: negative == prompt cancels guidance
    # (u + g (c - u) = c), leaving the conditional-only result up to batched-call rounding.
    cancelled = generate(pipe, PROMPTS[:1], steps=4, guidance=5.0, seed=1, negative=PROMPTS[0])
    cond_only = generate(pipe, PROMPTS[:1], steps=4, guidance=1.0, seed=1)
    assert (cancelled.latents - cond_only.latents).abs().mean() < 5e-7
    assert (base.latents[:1] - cond_only.latents).abs().mean() > 2e-6


def test_img2img_strength_zero_returns_encoded_decoded_input_and_one_ignores_it(pipe):
    image = Image.fromarray(shapes.render(shapes.ShapeAttrs("red", "circle", "left", "white"),
                                          resolution=32))
    x = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        roundtrip = pipe.vae.decode(pipe.vae.encode(x).mode())  # (1, 3, 32, 32)
    expected = ((roundtrip.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0)
    kept = generate(pipe, PROMPTS[:1], steps=4, seed=2, init_image=image, strength=0.0)
    # latents * scale / scale can differ from the posterior mean in the last bit: <= 1 level
    diff = np.abs(pixels(kept.images)[0].astype(int) - expected.numpy().astype(int))
    assert diff.max() <= 1
    ignored = generate(pipe, PROMPTS[:1], steps=4, seed=2, init_image=image, strength=1.0)
    plain = generate(pipe, PROMPTS[:1], steps=4, seed=2)
    assert torch.equal(ignored.latents, plain.latents)
    halfway = generate(pipe, PROMPTS[:1], steps=4, seed=2, init_image=image, strength=0.5)
    assert not torch.equal(halfway.latents, plain.latents)
    assert not torch.equal(halfway.latents, kept.latents)


class RecordingUNet(torch.nn.Module):
    """The pipeline's UNet, recording the timestep and input of every call."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []

    def forward(self, x, t, context):
        self.calls.append((t.clone(), x.clone()))
        return self.unet(x, t, context)


@pytest.mark.parametrize("sampler", ["pndm", "lms"])
def test_one_step_denoises_once_from_the_noisiest_timestep(pipe, sampler):
    """One step is one UNet call at t = T - 1 on the pure-noise sample (the SD pipelines call
    at t = 1 for PNDM, or at t = 0 on noise scaled by 0.029 for LMS)."""
    recorder = RecordingUNet(pipe.unet)
    out = generate(dataclasses.replace(pipe, unet=recorder), PROMPTS[:1], sampler=sampler, steps=1,
                   guidance=1.0, seed=11)
    assert len(recorder.calls) == 1 and torch.isfinite(out.latents).all()
    t, x_in = recorder.calls[0]
    assert t.tolist() == [999]
    noise = torch.randn((4, 4, 4), generator=rng.generator(11))[None]
    alpha_bar = NoiseSchedule.from_config(pipe.cfg.schedule).alphas_cumprod[-1].item()
    sigma = math.sqrt((1 - alpha_bar) / alpha_bar)  # LMS: x = sigma eps, fed as x / sqrt(sigma^2 + 1)
    expected = noise if sampler == "pndm" else noise * sigma / math.sqrt(sigma**2 + 1)
    torch.testing.assert_close(x_in, expected, rtol=1e-6, atol=1e-6)


def test_every_step_count_up_to_t_runs(pipe):
    """The far edge of the range: T steps (PNDM trailing + PLMS: T + 1 calls) run and stay finite."""
    recorder = RecordingUNet(pipe.unet)
    out = generate(dataclasses.replace(pipe, unet=recorder), PROMPTS[:1], steps=1000, guidance=1.0,
                   seed=1)
    assert torch.isfinite(out.latents).all()
    assert [int(t) for t, _ in recorder.calls] == [999, 998] + list(range(998, -1, -1))


def test_weights_held_in_bf16_sample_under_autocast_and_refuse_fp32(run_dir):
    """hold_weights leaves a CPU pipeline alone; the bf16-weight networks it makes on CUDA run
    under autocast (tried here on the CPU with cast_networks), close to fp32 weights under
    bf16 autocast; fp32 sampling on such a pipeline is a clear error, not a dtype crash."""
    from t2i.sample import cast_networks, hold_weights

    fp32_pipe = load_pipeline(run_dir)
    assert hold_weights(fp32_pipe, "bf16") is fp32_pipe  # CPU: unchanged
    reference = generate(fp32_pipe, PROMPTS[:1], steps=3, seed=6, precision="bf16")
    held = cast_networks(load_pipeline(run_dir), torch.bfloat16)
    assert next(held.unet.parameters()).dtype == torch.bfloat16
    assert next(held.vae.parameters()).dtype == torch.float32
    out = generate(held, PROMPTS[:1], steps=3, seed=6, precision="bf16")
    assert out.latents.dtype == torch.float32
    assert (out.latents - reference.latents).abs().mean() < 0.05 * reference.latents.abs().mean()
    with pytest.raises(ValueError, match="load it again"):
        generate(held, PROMPTS[:1], steps=3, seed=6, precision="fp32")


# ----------------------------------------------------------------------------------------------
# Shapes suite on planted images
# ----------------------------------------------------------------------------------------------


def planted(prompt_attrs: dict[str, shapes.ShapeAttrs], wrong: dict[str, shapes.ShapeAttrs]):
    """A stand-in for `generate` that renders each prompt's own target, or a planted wrong one."""
    def fake_generate(pipe, prompts, *, seed, **_):
        images = [Image.fromarray(shapes.render(wrong.get(p, prompt_attrs[p]), 64)) for p in prompts]
        return Generation(images, list(prompts), [seed + i for i in range(len(prompts))],
                          torch.zeros(len(prompts), 4, 8, 8))
    return fake_generate


def test_score_split_counts_each_attribute_exactly():
    cases = shapes.eval_cases(True, 6)
    images = [shapes.render(t, 64) for _, t in cases]
    c1, c4 = cases[1][1], cases[4][1]
    other_colour = next(c for c in shapes.COLOURS if c != c1.colour)
    other_position = "right" if c4.position != "right" else "left"
    other_background = "black" if c4.background != "black" else "white"
    images[1] = shapes.render(shapes.ShapeAttrs(other_colour, c1.shape, c1.position,
                                                c1.background), 64)
    images[4] = shapes.render(shapes.ShapeAttrs(c4.colour, c4.shape, other_position,
                                                other_background), 64)
    acc, failures = metrics.score_split("seen", cases, images, list(range(10, 16)))
    assert acc == {"n": 6, "colour": 5 / 6, "shape": 1.0, "position": 5 / 6,
                   "background": 5 / 6, "all": 4 / 6}
    assert [(f.prompt, f.seed) for f in failures] == [(cases[1][0], 11), (cases[4][0], 14)]
    assert failures[0].found.colour == other_colour
    assert failures[1].found.position == other_position


def test_shapes_suite_splits_seen_and_held_out(monkeypatch):
    seen, held = shapes.eval_cases(True, 4), shapes.eval_cases(False, 3)
    targets = dict(seen + held)
    h0 = held[0][1]  # the first held-out prompt gets the wrong shape
    wrong_shape = next(s for s in shapes.SHAPES if s != h0.shape)
    wrong = {held[0][0]: shapes.ShapeAttrs(h0.colour, wrong_shape, h0.position, h0.background)}
    monkeypatch.setattr(metrics, "generate", planted(targets, wrong))
    report, failures = metrics.shapes_suite(None, n=4, n_held_out=3, seed=100)
    assert report["n"] == 7
    assert report["accuracy"]["seen"] == {"n": 4, "colour": 1.0, "shape": 1.0, "position": 1.0,
                                          "background": 1.0, "all": 1.0}
    assert report["accuracy"]["held_out"] == {"n": 3, "colour": 1.0, "shape": 2 / 3,
                                              "position": 1.0, "background": 1.0, "all": 2 / 3}
    # held-out images come after the 4 seen ones: seed 100 + 4
    assert report["failures"] == [{"split": "held_out", "prompt": held[0][0], "seed": 104,
                                   "found": {"colour": h0.colour, "shape": wrong_shape,
                                             "position": h0.position,
                                             "background": h0.background}}]
    grid = metrics.failures_grid(failures)
    assert grid.size == (64 + 4, 64 + 4)  # one image, 2-pixel padding around it
    assert metrics.failures_grid([]) is None


# ----------------------------------------------------------------------------------------------
# Other suites
# ----------------------------------------------------------------------------------------------


def test_sampler_agreement_report(pipe):
    report = metrics.sampler_agreement(pipe, PROMPTS[:2], seed=0, guidance=3.0,
                                       compare_steps=3, steps_list=(2, 6), reference_steps=6)
    assert report["n"] == 2 and report["compare_steps"] == 3 and report["reference_steps"] == 6
    assert report["pndm_vs_lms"] > 0
    for sampler in ("pndm", "lms"):
        distances = report["distance_to_reference"][sampler]
        assert set(distances) == {"2", "6"}
        assert distances["6"] == 0.0 and distances["2"] > 0  # the reference itself is 0 (deterministic)


def scipy_fid(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook formula in float64 with scipy's matrix square root."""
    linalg = pytest.importorskip("scipy.linalg")  # a dev extra
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real))


@pytest.mark.parametrize("n1,n2,d", [(50, 40, 6), (5, 7, 12), (9, 30, 12)])
def test_frechet_distance_matches_scipy_sqrtm(n1, n2, d):
    """Full-rank covariances (eigh route) and fewer samples than dimensions (nuclear-norm route)."""
    g = torch.Generator().manual_seed(n1 + d)
    x = torch.randn(n1, d, generator=g, dtype=torch.float64)
    y = torch.randn(n2, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
    expected = scipy_fid(x.numpy(), y.numpy())
    assert metrics.features_frechet_distance(x, y) == pytest.approx(expected, rel=1e-6)
    assert metrics.frechet_distance(*metrics.feature_stats(x), *metrics.feature_stats(y)) == \
        pytest.approx(expected, rel=1e-6)
    assert metrics.features_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_fid_suite_with_stand_in_extractors(pipe):
    features = lambda x: torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)  # noqa: E731  (B, 6)
    clip = lambda x, prompts: torch.full((len(prompts),), 30.0)  # noqa: E731
    done: list[int] = []
    report = metrics.fid_suite(pipe, "shapes", 5, features, clip, steps=2, batch_size=3,
                               on_batch=done.append)
    assert report["n"] == 5 and report["fid"] > 0 and report["clip_score"] == 30.0
    assert done == [3, 2]  # the progress bar's counts: every image, batch by batch
    no_clip = metrics.fid_suite(pipe, "shapes", 3, features, None, steps=2, batch_size=3)
    assert no_clip["clip_score"] is None and no_clip["fid"] > 0


def test_vae_suite_report(pipe):
    report = metrics.vae_suite(pipe, "shapes", n=5, batch_size=2)
    assert report["n"] == 5 and report["source"] == "shapes"
    assert 0 < report["psnr_db_min"] <= report["psnr_db"] and -1 <= report["ssim"] <= 1


# ----------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------


def test_eval_cli_shapes_report_schema(run_dir, tmp_path):
    result = invoke(eval_cli, run_dir, "--suite", "shapes", "--n", 3, "--n-held-out", 2,
                    "--steps", 2, "--seed", 4, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval-shapes.json").read_text())
    assert report["suite"] == "shapes" and report["n"] == 5 and report["weights"] == "ema"
    assert Path(report["checkpoint"]) == run_dir / "unet" / "ckpt-0000003"
    run_guidance = json.loads((run_dir / "config.json").read_text())["train"]["sample_guidance"]
    assert report["sampler"] == {"name": "pndm", "steps": 2, "guidance": run_guidance, "seed": 4}
    for split, n in (("seen", 3), ("held_out", 2)):
        acc = report["accuracy"][split]
        assert set(acc) == {"n", "colour", "shape", "position", "background", "all"}
        assert acc["n"] == n and all(0 <= acc[k] <= 1 for k in acc if k != "n")
    for failure in report["failures"]:
        assert set(failure) == {"split", "prompt", "seed", "found"} and 4 <= failure["seed"] < 9
    assert (tmp_path / "shapes_failures.png").is_file() == bool(report["failures"])


def test_eval_cli_explicit_guidance_beats_the_runs(run_dir):
    result = invoke(eval_cli, run_dir, "--suite", "agreement", "--n", 1, "--steps", 2,
                    "--guidance", 2.5, "--seed", 3)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sampler"] == {"name": "pndm", "steps": 2, "guidance": 2.5, "seed": 3}


def test_eval_cli_vae_report_schema(run_dir):
    result = invoke(eval_cli, run_dir, "--suite", "vae", "--n", 2, "--seed", 7)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"] == 7 and "sampler" not in report  # it samples no images
    assert {"suite", "n", "checkpoint", "weights", "device", "psnr_db", "ssim"} <= set(report)
    assert report["n"] == 2 and report["weights"] == "file"  # the VAE file: no EMA choice


def test_sample_cli_writes_pngs_named_by_prompt_and_seed(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle on the left\n\na blue square\n")
    result = invoke(sample_cli, run_dir, "a green triangle", "--prompts", prompts, "--steps", 2,
                    "--seed", 10, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["a-blue-square-seed12.png", "a-green-triangle-seed10.png",
                     "a-red-circle-on-the-left-seed11.png", "grid.png"]
    assert "seed 11:" in result.output


def test_generate_hands_over_each_batch_as_it_is_decoded(pipe):
    """on_batch gets each batch's images, prompts and seeds in order; together they are the
    returned Generation, image for image."""
    prompts = ["a red circle", "a blue square", "a green triangle"]
    parts: list[Generation] = []
    out = generate(pipe, prompts, steps=2, batch_size=2, seed=20, guidance=3.0,
                   on_batch=parts.append)
    assert [part.seeds for part in parts] == [[20, 21], [22]]
    assert [part.prompts for part in parts] == [prompts[:2], prompts[2:]]
    images = [image for part in parts for image in part.images]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, out.images))
    assert torch.equal(torch.cat([part.latents for part in parts]), out.latents)


def test_generate_reports_each_denoising_step(pipe):
    """on_step(i, n) after each LMS step of each batch (n: the UNet calls, which for PNDM are
    one more than its steps): 3 steps twice; img2img at strength 0.5 of 4 runs the last 2."""
    events: list = []
    generate(pipe, ["a red circle"] * 3, steps=3, batch_size=2, sampler="lms",
             on_step=lambda i, n: events.append((i, n)),
             on_batch=lambda part: events.append(len(part.images)))
    assert events == [(1, 3), (2, 3), (3, 3), 2, (1, 3), (2, 3), (3, 3), 1]
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    events.clear()
    generate(pipe, ["a red circle"], steps=4, init_image=image, strength=0.5, sampler="lms",
             on_step=lambda i, n: events.append((i, n)))
    assert events == [(1, 2), (2, 2)]


def test_sample_cli_keeps_the_batches_written_before_a_failure(run_dir, tmp_path, monkeypatch):
    """Images are written batch by batch: a run stopped in its second batch keeps the first."""
    import t2i.sample as sample_module

    real, calls = sample_module._generate_chunk, []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("stopped in the second batch")
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_module, "_generate_chunk", failing_second)
    result = invoke(sample_cli, run_dir, "a red circle", "a blue square", "a green triangle",
                    "--steps", 2, "--batch-size", 2, "--seed", 5, "--out", tmp_path / "out")
    assert result.exit_code != 0 and isinstance(result.exception, RuntimeError)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a-blue-square-seed6.png", "a-red-circle-seed5.png"]


def one_line_error(result, needle: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1


@pytest.mark.parametrize("cli,args", [(sample_cli, ["a red circle"]),
                                      (eval_cli, ["--suite", "shapes"])])
def test_missing_run_is_a_one_line_error(cli, args, tmp_path):
    one_line_error(invoke(cli, tmp_path / "nope", *args), "no such run folder")


def test_missing_prompt_file_is_a_one_line_error(run_dir, tmp_path):
    one_line_error(invoke(sample_cli, run_dir, "--prompts", tmp_path / "none.txt"), "no such file")
    one_line_error(invoke(eval_cli, run_dir, "--suite", "agreement", "--prompts",
                          tmp_path / "none.txt"), "no such file")


@pytest.mark.parametrize("size", ["20", "36"])
def test_size_not_a_multiple_is_a_one_line_error(run_dir, size):
    result = invoke(sample_cli, run_dir, "a red circle", "--height", size, "--steps", 1)
    one_line_error(result, f"--height {size} must be a positive multiple of 16")


def test_fid_without_weights_says_what_is_missing(run_dir, tmp_path):
    result = invoke(eval_cli, run_dir, "--suite", "fid", "--n", 4)
    one_line_error(result, "Inception-v3 weights")
    assert "--clip-weights" in result.output
    missing = invoke(eval_cli, run_dir, "--suite", "fid", "--n", 4, "--clip-weights", "x.pt",
                     "--inception-weights", tmp_path / "missing.pth")  # given: refused up front
    one_line_error(missing, f"--inception-weights {str(tmp_path / 'missing.pth')!r} does not exist")


def test_eval_cli_fid_with_local_inception_weights(run_dir, tmp_path):
    """Random Inception weights saved locally stand in for the real file: the loading,
    resizing and report plumbing run; CLIP is missing, so it is warned about and null."""
    torchvision = pytest.importorskip("torchvision")
    inception = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(inception.state_dict(), tmp_path / "inception.pth")
    result = invoke(eval_cli, run_dir, "--suite", "fid", "--n", 3, "--steps", 2,
                    "--inception-weights", tmp_path / "inception.pth")
    assert result.exit_code == 0, result.output
    assert "warning: CLIP score needs" in result.stderr
    report = json.loads(result.stdout)
    assert report["suite"] == "fid" and report["n"] == 3 and report["source"] == "shapes"
    assert report["fid"] > 0 and report["clip_score"] is None



class _RecordingUNet(torch.nn.Module):
    """The pipeline's UNet, noting the batch size of every call."""

    def __init__(self, unet: torch.nn.Module, seen: list[int]):
        super().__init__()
        self.unet, self.seen = unet, seen

    def forward(self, x, t, context):
        self.seen.append(x.shape[0])
        return self.unet(x, t, context)


def test_compiled_pipeline_pads_the_last_batch_to_one_shape(pipe):
    """With a compiled UNet, 3 prompts in batches of 2 give the UNet one shape (2 x 2 rows with
    guidance; a third shape would compile again): the last chunk is padded with its own prompt
    and seed, and the extra row dropped. The images are the unpadded run's."""
    from t2i.sample import compile_pipeline

    assert compile_pipeline(pipe).compiled and not pipe.compiled
    prompts = ["a red circle", "a blue square", "a green triangle"]
    seen_padded: list[int] = []
    seen_eager: list[int] = []
    padded = dataclasses.replace(pipe, unet=_RecordingUNet(pipe.unet, seen_padded), compiled=True)
    eager = dataclasses.replace(pipe, unet=_RecordingUNet(pipe.unet, seen_eager))
    options = dict(steps=2, batch_size=2, seed=5, guidance=3.0)
    out = generate(padded, prompts, **options)
    ref = generate(eager, prompts, **options)
    assert set(seen_padded) == {4} and set(seen_eager) == {4, 2}
    assert out.seeds == ref.seeds == [5, 6, 7] and out.latents.shape[0] == 3
    torch.testing.assert_close(out.latents, ref.latents, atol=1e-5, rtol=1e-5)
    # one prompt with a larger batch size is not padded up to it
    seen_padded.clear()
    generate(padded, prompts[:1], **options)
    assert set(seen_padded) == {2}
