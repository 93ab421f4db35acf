"""The GPU check on the CPU: bench/gpu_check.sh end to end in its smoke mode (tiny preset, quick,
nothing compiled), its budget accounting, the correctness checks of bench/gpu_checks.py, results
written as they are measured, and MFU against the right peak. No timing assertions."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from bench import core, flops, gpu_checks
from bench.__main__ import main as bench_main

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.sh"
CHECK_ARGS = ["--device", "cpu", "--preset", "tiny", "--resolution", "32", "--steps", "2",
              "--compile-backend", "none"]


def run_script(tmp_path: Path, *args: str, budget: int = 1500) -> subprocess.CompletedProcess:
    """The script with `budget` seconds (generous: in --smoke only the budget caps a step, so the
    outcome does not depend on how fast this machine is)."""
    env = {**os.environ, "PYTHON": sys.executable, "T2I_RESULTS": str(tmp_path),
           "T2I_BUDGET_S": str(budget), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=budget + 300)


def summary_lines(tmp_path: Path) -> list[str]:
    (summary,) = tmp_path.glob("gpu-check-*.txt")
    return summary.read_text().splitlines()


# ----------------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------------


def test_script_smoke_runs_every_step_and_writes_every_json(tmp_path):
    result = run_script(tmp_path, "--smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = summary_lines(tmp_path)
    assert len(lines) == 13 and all(" ok " in line for line in lines), lines
    names = [line[:36].strip() for line in lines]
    # eager numbers first, compiled after, the both-ways variants last
    assert names[:4] == ["checks eager", "train-step small 256 eager", "sample base 512 b1 eager",
                         "train-step base 256 eager"]
    assert names[4:8] == ["checks compiled", "train-step small 256 compiled",
                          "sample base 512 b1 compiled", "train-step base 256 compiled"]
    assert names[8] == "train-step base 256 latents compiled"
    documents = {path.name: json.loads(path.read_text()) for path in tmp_path.glob("*.json")}
    assert len(documents) == 13
    for name, document in documents.items():
        if name.startswith("gpu-checks"):
            assert document["checks"] and all(c["passed"] for c in document["checks"])
        else:
            rows = document["results"]
            assert rows and not [row for row in rows if "error" in row], name
    eager_checks = next(d for n, d in documents.items() if n.startswith("gpu-checks-eager"))
    assert [c["check"] for c in eager_checks["checks"]] == list(gpu_checks.EAGER_CHECKS)
    benchmark = next(d for n, d in documents.items() if "cudnn-benchmark" in n)
    assert benchmark["context"]["cudnn_benchmark"] is True
    assert benchmark["environment"]["cudnn_benchmark"] is True
    nchw = next(d for n, d in documents.items() if "contiguous" in n)
    assert nchw["environment"]["memory_format"] == "contiguous"
    assert benchmark["environment"]["memory_format"] == "channels_last"
    latents = next(d for n, d in documents.items() if "latents-compiled" in n)
    assert latents["context"]["latents"] is True
    assert all(row["input"].endswith(" moments") for row in latents["results"])
    profiled = next(d for n, d in documents.items() if "profile" in n)
    assert profiled["profiles"]["train-step"]["top"]  # the kernels where the step's time went


def test_script_skips_what_the_budget_cannot_hold(tmp_path):
    result = run_script(tmp_path, "--smoke", budget=0)
    assert result.returncode == 0, result.stdout[-2000:]
    lines = summary_lines(tmp_path)
    assert len(lines) == 13 and all("skipped (budget" in line for line in lines)
    assert not list(tmp_path.glob("*.json"))


def test_script_runs_the_steps_named_in_their_order(tmp_path):
    """A lease that already holds the eager rows spends its time on the steps it names."""
    result = run_script(tmp_path, "--smoke", "train-base-latents-compiled", "checks-eager", budget=0)
    assert result.returncode == 0, result.stdout[-2000:]
    names = [line[:36].strip() for line in summary_lines(tmp_path)]
    assert names == ["train-step base 256 latents compiled", "checks eager"]


def test_script_help_lists_the_steps(tmp_path):
    result = run_script(tmp_path, "--help")
    assert result.returncode == 0 and "train-base-latents-compiled" in result.stdout


@pytest.mark.parametrize("args", [("--bogus",), ("--smoke", "train-base-fast")], ids=["option", "step"])
def test_script_bad_argument_is_exit_2(tmp_path, args):
    result = run_script(tmp_path, *args)
    assert result.returncode == 2 and "usage" in result.stderr and "unknown" in result.stderr
    assert not list(tmp_path.glob("gpu-check-*.txt"))  # refused before anything ran


# ----------------------------------------------------------------------------------------------
# Results written as they are measured
# ----------------------------------------------------------------------------------------------


@core.register_case("_test_first")
def _first_case(ctx):
    stats = core.time_fn(lambda: None, ctx=ctx)
    return [core.result_row("_test_first", "first", stats)]


@core.register_case("_test_killed")
def _killed_case(ctx):
    raise KeyboardInterrupt  # stands in for the SIGTERM of the step's timeout mid-case


def test_bench_json_holds_every_finished_case_when_a_later_one_is_killed(tmp_path):
    out = tmp_path / "r.json"
    args = ["_test_first", "_test_killed", "--device", "cpu", "--repeats", "1", "--warmup", "0",
            "--json", str(out)]
    CliRunner().invoke(bench_main, args)
    rows = json.loads(out.read_text())["results"]
    assert [row["name"] for row in rows] == ["first"]
    assert not (tmp_path / "r.json.tmp").exists()


def test_checks_report_after_every_check():
    seen = []
    ctx = core.BenchContext(preset="tiny", resolution=32, compile_backend="none")
    gpu_checks.run_checks(ctx, 2, ("amp-bf16", "sampler-fp32"),
                          on_result=lambda results: seen.append([r["check"] for r in results]))
    assert seen == [["amp-bf16"], ["amp-bf16", "sampler-fp32"]]


def test_each_check_starts_from_empty_dynamo_caches(monkeypatch):
    """A check compiles as a fresh process would: dynamo's caches are emptied before each one
    (the previous check's UNet compiled at batch 2 would make a batch-4 call recompile with a
    dynamic batch dimension). The reset happens before the check's first call."""
    events = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: events.append("reset"))
    for function, label in (("amp_bf16", "amp"), ("sampler_fp32", "fp32")):
        monkeypatch.setattr(gpu_checks, function,
                            lambda cfg, ctx, label=label: events.append(label) or {"check": label})
    ctx = core.BenchContext(preset="tiny", resolution=32, compile_backend="none")
    gpu_checks.run_checks(ctx, 2, ("amp-bf16", "sampler-fp32"))
    assert events == ["reset", "amp", "reset", "fp32"]


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------


def test_gpu_checks_smoke_mode(tmp_path):
    out = tmp_path / "checks.json"
    result = CliRunner().invoke(gpu_checks.main, [*CHECK_ARGS, "--json", str(out)])
    assert result.exit_code == 0, result.output
    checks = {c["check"]: c for c in json.loads(out.read_text())["checks"]}
    assert list(checks) == list(gpu_checks.TOLERANCE)
    assert 0 < checks["amp-bf16"]["rel_l2"] < checks["amp-bf16"]["tolerance"]  # bf16 did run
    assert checks["sampler-fp32"]["rel_l2"] == 0.0 and len(checks["sampler-fp32"]["parts"]) == 4
    for name in ("graph-sampling", "graph-sampling-bf16"):
        assert len(checks[name]["parts"]) == 12  # 2 samplers x 2 modes x 3 calls
    assert checks["graph-sampling-bf16"]["weights"] == "float32"  # bf16 weights on CUDA only


def test_gpu_checks_fail_loudly(monkeypatch, tmp_path):
    monkeypatch.setitem(gpu_checks.TOLERANCE, "amp-bf16", 0.0)
    result = CliRunner().invoke(gpu_checks.main, [*CHECK_ARGS, "--checks", "amp-bf16"])
    assert result.exit_code == 1 and "FAIL  amp-bf16" in result.output


def test_one_crashing_sampler_does_not_hide_the_other(monkeypatch):
    real_loop_fn = gpu_checks.loop_fn

    def loop_fn(unet, sampler, state, loop, x, ctx):
        if isinstance(state, gpu_checks.sampler_module("lms").LMSState):
            def crash():
                raise RuntimeError("lms broke")
            return crash
        return real_loop_fn(unet, sampler, state, loop, x, ctx)

    monkeypatch.setattr(gpu_checks, "loop_fn", loop_fn)
    ctx = core.BenchContext(preset="tiny", resolution=32, compile_backend="none")
    (result,) = gpu_checks.run_checks(ctx, 2, ("graph-sampling-bf16",))
    assert not result["passed"] and "lms eager: RuntimeError: lms broke" in result["error"]
    assert len(result["parts"]) == 6 and all(k.startswith("pndm") for k in result["parts"])


def test_unknown_check_is_one_line_exit_2():
    result = CliRunner().invoke(gpu_checks.main, [*CHECK_ARGS, "--checks", "amp-bf16,nope"])
    assert result.exit_code == 2 and "unknown check 'nope'" in result.output


# ----------------------------------------------------------------------------------------------
# MFU against the peak the arithmetic can reach
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def fake_h100(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    return core.BenchContext(device="cuda")


@contextlib.contextmanager
def tf32(allowed: bool):
    """cuDNN and matmul TF32 flags set for the block, then restored."""
    saved = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = allowed
    torch.set_float32_matmul_precision("high" if allowed else "highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        torch.set_float32_matmul_precision(saved[1])


def test_fp32_mfu_is_against_the_tf32_peak_when_tf32_is_allowed(fake_h100):
    with tf32(True):
        assert core.tf32_allowed()
        check_peaks(fake_h100)
    with tf32(False):
        assert not core.tf32_allowed()
        assert flops.peak_tflops(fake_h100, "fp32") == 67.0
        extras = flops.throughput({"median_s": 1.0}, ctx=fake_h100, samples=1,
                                 flops_per_sample=10e12, dtype="fp32")
        assert extras["mfu"] == pytest.approx(10 / 67.0) and extras["mfu_peak"] == "fp32"


def check_peaks(fake_h100):
    assert flops.peak_tflops(fake_h100, "fp32") == 494.5
    assert flops.peak_tflops(fake_h100, "bf16") == 989.0
    stats = {"median_s": 1.0}
    extras = flops.throughput(stats, ctx=fake_h100, samples=1, flops_per_sample=100e12, dtype="fp32")
    assert extras["mfu"] == pytest.approx(100 / 494.5) and extras["mfu_peak"] == "tf32"


def test_every_device_with_an_fp32_peak_has_a_tf32_peak():
    fragments = {fragment for fragment, dtype in flops.PEAK_TFLOPS if dtype == "fp32"}
    for fragment in fragments:
        fp32, tf32, bf16 = (flops.PEAK_TFLOPS[(fragment, d)] for d in ("fp32", "tf32", "bf16"))
        assert fp32 <= tf32 < bf16  # equal on an L40 (its spec sheet: 90.5 both)


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H200", "tf32", 494.5),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA L40S", "bf16", 362.05), ("NVIDIA L40", "fp32", 90.5),
    ("NVIDIA RTX A1000", "bf16", None), ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA GeForce RTX 4090", "bf16", None)])
def test_a_device_peak_matches_whole_words_of_the_gpu_name(name, dtype, peak):
    """"L4" is inside "L40S" and "A100" inside "A1000": a substring match gave an L40S the L4's
    peak (its MFU 3x too high) and an RTX A1000 the A100's."""
    assert flops.device_peak(name, dtype) == peak
