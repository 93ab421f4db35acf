"""The train-step / sample bench cases and the GPU checks, on tiny CPU settings: they run through
the real step and sampling code, the JSON has the fields, ratios and overhead shares come from
the rows of the same run, FLOPs count attention too. No timing assertions. Compiling is switched
off (`--compile-backend none`) to keep this fast: the compiled rows then run eager code through
the same plumbing; the compiled paths themselves are covered by the scheduler compile tests and
by bench/gpu_check.sh (whose checks and smoke run are in test_gpu_check.py)."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bench import core, flops, tables
from bench.__main__ import main

QUICK = ["--device", "cpu", "--preset", "tiny", "--quick", "--repeats", "2", "--warmup", "0",
         "--threads", "1", "--compile-backend", "none"]


def run_cli(tmp_path, *args: str) -> dict:
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, [*args, *QUICK, "--json", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_rate_columns_are_not_printed_as_milliseconds():
    row = core.result_row("c", "n", {"median_s": 0.5, "p10_s": 0.4, "p90_s": 0.6, "repeats": 3},
                          samples_per_s=123.0, images_per_s=7.0, unet_calls_s=0.25)
    header, _, cells = tables.format_table([row]).splitlines()
    values = dict(zip(header.split(), cells.split()))
    assert values["median_ms"] == "500" and values["unet_calls_ms"] == "250"
    assert values["samples_per_s"] == "123" and values["images_per_s"] == "7"


def test_flop_count_includes_cpu_attention():
    """FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel; bench.core
    maps it, so counts do not depend on the device. Attention forward is two matmuls
    (Q K^T, P V); a flash backward recomputes Q K^T and then forms dV, dP, dQ, dK: five.
    Each is 2 B H L S E FLOPs, 14 B H L S E in all."""
    b, h, l, s, e = 2, 3, 16, 24, 8
    q = torch.randn(b, h, l, e, requires_grad=True)
    k, v = torch.randn(b, h, s, e, requires_grad=True), torch.randn(b, h, s, e, requires_grad=True)
    attention = torch.nn.functional.scaled_dot_product_attention
    assert flops.count_flops(lambda: attention(q, k, v)) == 4 * b * h * l * s * e
    assert flops.count_flops(lambda: attention(q, k, v).sum().backward()) == 14 * b * h * l * s * e


def test_unet_forward_count_on_cpu_matches_the_meta_count():
    from t2i.config import get_preset
    from t2i.models.unet import UNet

    cfg = get_preset("tiny").unet
    unet = UNet(cfg)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 77, cfg.context_dim)
    assert flops.count_flops(lambda: unet(x, t, c)) / 2 == pytest.approx(unet_forward_flops(), rel=1e-6)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["cpu-without-bf16", "cpu-with-bf16"])
def test_train_step_cases_time_the_real_steps(tmp_path, monkeypatch, native_bf16):
    """The rows follow what the bench is told about the CPU, never the CPU the test runs on:
    both answers of `bf16_supported` are pinned (bf16 autocast runs either way, emulated where
    the CPU lacks the instructions)."""
    import bench.cases.train as train_cases

    monkeypatch.setattr(train_cases, "bf16_supported", lambda device: native_bf16)
    document = run_cli(tmp_path, "train-step", "train-step-vae")
    rows = {(row["case"], row["name"]): row for row in document["results"]}
    names = ("fp32 eager", "fp32 compiled") + (("bf16 eager",) if native_bf16 else ())
    assert set(rows) == {(case, name) for case in ("train-step", "train-step-vae")
                         for name in names}
    for (case, name), row in rows.items():
        assert {"median_s", "samples_per_s", "flops_per_sample", "tflops", "batch", "precision",
                "stage", "params_m"} <= set(row)
        assert row["flops_per_sample"] > 0 and row["batch"] == 2
        eager = rows[(case, "fp32 eager")]
        if name == "fp32 compiled":
            assert row["ratio"] == pytest.approx(eager["median_s"] / row["median_s"])
            assert row["ratio_compiled"] == row["ratio"] and row["ratio_compiled_vs"] == "fp32 eager"
        assert row["tflops"] == pytest.approx(row["flops_per_sample"] * 2 / row["median_s"] / 1e12)
    # stage 2 counts the UNet and text tower steps plus the VAE encode: more than the UNet alone
    unet = rows[("train-step", "fp32 eager")]
    assert unet["stage"] == "unet" and rows[("train-step-vae", "fp32 eager")]["stage"] == "vae"
    assert unet["flops_per_sample"] > 3 * unet_forward_flops()


def test_train_step_from_latents_leaves_the_encode_out_of_the_step(tmp_path):
    """--latents feeds stored moments as training on latent shards does: the step reads
    (B, 2z, h, w) moments, and its FLOPs are the image step's less exactly one VAE encode."""
    from bench.cases.train import bench_config, random_images
    from t2i.train.stages import build_vae

    images = run_cli(tmp_path, "train-step")["results"]
    moments = run_cli(tmp_path, "train-step", "--latents")["results"]
    image_row = next(row for row in images if row["name"] == "fp32 eager")
    latent_row = next(row for row in moments if row["name"] == "fp32 eager")
    assert image_row["input"] == "2x3x32x32 images" and latent_row["input"] == "2x8x8x8 moments"
    cfg = bench_config(core.BenchContext(preset="tiny", quick=True), "unet")
    vae = build_vae(cfg, torch.device("cpu")).eval().requires_grad_(False)
    batch = random_images(cfg, torch.device("cpu"))
    with torch.no_grad():
        encode_flops = flops.count_flops(lambda: vae.encode(batch)) / cfg.train.batch_size
    assert encode_flops > 0
    assert image_row["flops_per_sample"] - latent_row["flops_per_sample"] == pytest.approx(encode_flops)


def unet_forward_flops() -> int:
    from t2i.config import get_preset
    from t2i.models.summary import forward_flops
    from t2i.models.unet import UNet

    cfg = get_preset("tiny").unet
    with torch.device("meta"):
        return forward_flops(UNet(cfg), torch.zeros(1, 4, 8, 8), torch.zeros(1),
                             torch.zeros(1, 77, cfg.context_dim))


PIPELINE_ROWS = {"generate b1 eager", "generate b1 compiled", "text encode b1", "vae decode b1"}


def test_sample_case_overhead_comes_from_the_same_run(tmp_path):
    document = run_cli(tmp_path, "sample", "--batch", "1")
    rows = {row["name"]: row for row in document["results"]}
    modes = ("eager", "compiled", "compiled+step")
    assert set(rows) == {f"{name} b1 {mode}" for name in ("pndm", "lms") for mode in modes} | {
        "unet alone b1 eager", "unet alone b1 compiled"} | PIPELINE_ROWS
    assert rows["pndm b1 eager"]["unet_calls"] == 6  # PLMS: the first interval is run twice
    assert rows["lms b1 eager"]["unet_calls"] == 5
    for mode in modes:
        alone = rows[f"unet alone b1 {'eager' if mode == 'eager' else 'compiled'}"]
        for name in ("pndm", "lms"):
            row = rows[f"{name} b1 {mode}"]
            per_call = alone["median_s"] / alone["unet_calls"]
            assert row["overhead_share"] == pytest.approx(
                1 - per_call * row["unet_calls"] / row["median_s"])
            assert row["images_per_s"] == pytest.approx(1 / row["median_s"])
            if mode != "eager":
                eager = rows[f"{name} b1 eager"]
                assert row["ratio"] == pytest.approx(eager["median_s"] / row["median_s"])


def test_profile_writes_a_trace_for_a_train_step_case(tmp_path):
    out = tmp_path / "prof"
    result = CliRunner().invoke(main, ["train-step-vae", "--no-compile", *QUICK, "--profile",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "trace-train-step-vae.json").is_file() and "Self CPU" in result.output
    assert "convolution" in (out / "top-kernels-train-step-vae.txt").read_text()


def test_source_digest_names_the_python_sources_alone(tmp_path):
    """The digest changes with any *.py byte under t2i/ or bench/ (or a file's name), and with
    nothing else: it names the code that ran where .git is stale."""
    for folder in ("t2i", "bench"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_text("x = 1\n")
    (tmp_path / "t2i" / "notes.md").write_text("one")
    first = core.source_digest(tmp_path)
    (tmp_path / "t2i" / "notes.md").write_text("two")
    (tmp_path / "README.md").write_text("not code")
    assert core.source_digest(tmp_path) == first
    (tmp_path / "bench" / "a.py").write_text("x = 2\n")
    changed = core.source_digest(tmp_path)
    assert changed != first
    (tmp_path / "bench" / "a.py").rename(tmp_path / "bench" / "b.py")
    assert core.source_digest(tmp_path) not in (first, changed)
    assert len(first) == 12 and int(first, 16) >= 0
    assert core.environment()["source_digest"] == core.source_digest()


class _SlowFirstCall(torch.nn.Module):
    """A stand-in compiled module: its first call takes 0.3 s more (the 'compile')."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, *args, **kwargs):
        import time

        if not self.calls:
            time.sleep(0.3)
        self.calls += 1
        return self.module(*args, **kwargs)


def _slow_first_call(fn, ctx, **options):
    return _SlowFirstCall(fn)


def test_compiled_rows_record_their_first_call(tmp_path, monkeypatch):
    """first_call_s: what a user waits for the first compiled result. Only compiled rows have
    it, and the variant that pays the compile shows it."""
    import bench.cases.sample as sample_cases
    import bench.cases.train as train_cases

    monkeypatch.setattr(train_cases, "compile_fn", _slow_first_call)
    monkeypatch.setattr(sample_cases, "compile_fn", _slow_first_call)
    rows = run_cli(tmp_path, "train-step", "sample", "--batch", "1")["results"]
    firsts = {row["name"]: row.get("first_call_s") for row in rows}
    assert firsts["fp32 compiled"] >= 0.3 and firsts["fp32 eager"] is None
    assert firsts["pndm b1 compiled"] >= 0.3  # the first variant to call the compiled UNet
    assert firsts["lms b1 eager"] is None
    assert set(name for name, s in firsts.items() if s is not None) == {
        "fp32 compiled", "pndm b1 compiled", "lms b1 compiled", "unet alone b1 compiled",
        "pndm b1 compiled+step", "lms b1 compiled+step", "generate b1 compiled"}


def test_sample_case_times_t2i_sample_end_to_end(tmp_path, monkeypatch):
    """The generate rows run t2i.sample.generate as t2i-sample does: the bench's steps and
    guidance, one prompt per batch, the run's precision, and for the compiled row a pipeline
    that is marked compiled and holds the loop rows' compiled UNet (no second compile)."""
    import bench.cases.sample as sample_cases

    calls = []
    real = sample_cases.generate

    def recording(pipe, prompts, **options):
        calls.append((pipe.compiled, type(pipe.unet).__name__, len(prompts), options))
        return real(pipe, prompts, **options)

    monkeypatch.setattr(sample_cases, "generate", recording)
    document = run_cli(tmp_path, "sample", "--batch", "1")
    rows = {row["name"]: row for row in document["results"]}
    assert PIPELINE_ROWS <= set(rows)
    expected = dict(steps=5, guidance=7.5, batch_size=1, precision="fp32")
    assert {(compiled, n, options == expected) for compiled, _, n, options in calls} == {
        (False, 1, True), (True, 1, True)}
    compiled_row, eager_row = rows["generate b1 compiled"], rows["generate b1 eager"]
    assert compiled_row["ratio"] == pytest.approx(eager_row["median_s"] / compiled_row["median_s"])
    assert "first_call_s" in compiled_row and "first_call_s" not in eager_row
    assert rows["vae decode b1"]["mode"] == "eager" and "steps" not in rows["vae decode b1"]
