"""t2i-bench plumbing on tiny settings: cases run, the JSON has the fields, ratios come from the
same run, bad input is one line with exit status 2. No timing assertions."""

import json

import pytest
import torch
from click.testing import CliRunner

from bench import core, flops
from bench.__main__ import main


@core.register_case("_test_tiny")
def _tiny_case(ctx):
    x = torch.ones(8)
    stats = core.time_alternating({"slow": lambda: (x * 2).sum(), "fast": lambda: x.sum()}, ctx=ctx)
    rows = [core.result_row("_test_tiny", name, s, **flops.throughput(s, ctx=ctx, samples=8, flops_per_sample=1.0))
            for name, s in stats.items()]
    return core.add_ratios(rows, "slow")


def test_time_alternating_interleaves_and_summarizes():
    calls = []
    ctx = core.BenchContext(repeats=3, warmup=1)
    stats = core.time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, ctx=ctx)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-up, then rotating rounds
    for s in stats.values():
        assert s["repeats"] == 3 and s["p10_s"] <= s["median_s"] <= s["p90_s"]


def test_cli_runs_a_case_and_writes_json(tmp_path):
    out = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["_test_tiny", "--device", "cpu", "--repeats", "3", "--warmup", "0",
                                       "--json", str(out), "--profile", "--out", str(tmp_path / "prof")])
    assert result.exit_code == 0, result.output
    assert "median_ms" in result.output and "vs slow" in result.output
    document = json.loads(out.read_text())
    for key in ("device_name", "torch", "dtype", "compile", "git_commit", "cpu_count", "date"):
        assert key in document["environment"]
    rows = {row["name"]: row for row in document["results"]}
    for row in rows.values():
        assert {"case", "name", "median_s", "p10_s", "p90_s", "repeats", "samples_per_s"} <= set(row)
    assert rows["fast"]["ratio"] == pytest.approx(rows["slow"]["median_s"] / rows["fast"]["median_s"])
    assert rows["fast"]["ratio_vs"] == "slow"
    assert (tmp_path / "prof" / "trace-_test_tiny.json").is_file()
    assert document["profiles"]["_test_tiny"]["top"]


def test_schedulers_case_ratios_come_from_the_same_run(tmp_path):
    out = tmp_path / "s.json"
    result = CliRunner().invoke(main, ["schedulers", "--device", "cpu", "--no-compile", "--quick",
                                       "--repeats", "2", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(out.read_text())["results"]}
    assert {"pndm eager", "lms eager"} <= set(rows)
    for sampler in ("pndm", "lms"):
        peer = rows.get(f"{sampler} diffusers")  # present when diffusers is installed
        if peer is not None:
            ours = rows[f"{sampler} eager"]
            assert ours["ratio"] == pytest.approx(peer["median_s"] / ours["median_s"])


def test_bad_input_is_one_line_and_exit_2():
    for args in (["no_such_case"], ["_test_tiny", "--preset", "huge"], []):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_compile_phase_times_name_where_a_compile_went():
    """After a compile, the bench JSON's compile_times holds torch's per-phase seconds (dynamo's
    tracing at least): what the next GPU lease reads when a compile is slow."""
    from bench import core

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torch.sin(x) * 2, backend="eager")
    compiled(torch.randn(4))
    times = core.compile_phase_times(min_s=0.0)
    assert times and all(s >= 0 for s in times.values())
    assert any("compile" in name for name in times)
    assert core.compile_phase_times(min_s=1e9) == {}
