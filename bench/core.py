"""Benchmark plumbing shared by every case: context, case registry, timers, environment, output.

A case is a function `fn(ctx: BenchContext) -> list[dict]` registered with `@register_case(name)`
in a module under `bench/cases/`. Each dict is one result row with at least "case", "name",
"median_s", "p10_s", "p90_s", "repeats" (use `result_row`), plus any extras ("samples_per_s",
"flops_per_sample", "tflops", "mfu", "ratio_vs" / "ratio"). Baselines are timed in the same run
as the candidates (`time_alternating`) so that ratios compare like with like.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from t2i.config import Config, get_preset

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

CaseFn = Callable[["BenchContext"], list[dict]]
CASES: dict[str, CaseFn] = {}
NOT_IN_ALL: set[str] = set()  # cases `all` leaves out (named explicitly to run)
IMPORT_ERRORS: dict[str, str] = {}  # case module -> error message, for modules that failed to import

MEMORY_FORMATS = ("channels_last", "contiguous")  # NHWC, NCHW: unet/vae.channels_last on, off


class SkipCase(Exception):
    """Raised by a case that cannot run here (no CUDA, optional weights missing): reported, not fatal."""


@dataclass(frozen=True)
class BenchContext:
    """What every case is told. `compile`: also time torch.compile'd variants (eager is always the
    baseline). `quick`: smallest sizes and few repeats, for tests and smoke runs."""

    preset: str = "tiny"
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16
    compile: bool = True
    repeats: int = 20
    warmup: int = 3
    quick: bool = False
    profile: bool = False
    out_dir: Path = Path("bench/out")
    resolution: int | None = None  # image side for the model cases; None: the preset's
    batch: int | None = None  # per-step batch for train-step / sample; None: the case's default
    compile_backend: str = "inductor"  # aot_eager | eager: no codegen; none: plumbing smoke runs
    slow_compile: bool = False  # also compile where inductor takes many minutes (CPU train steps)
    cudnn_benchmark: bool = False  # torch.backends.cudnn.benchmark for the run (autotuned convs)
    memory_format: str = "channels_last"  # activation layout of UNet and VAE (MEMORY_FORMATS)
    fp32_weights: bool = False  # sample: keep fp32 UNet weights under bf16 autocast on CUDA
    latents: bool = False  # train-step: batches of stored VAE moments (latent shards), no encode

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def compile_fn(fn: Callable, ctx: BenchContext, **options: Any) -> Callable:
    """torch.compile with the context's backend: inductor, or aot_eager / eager (capture without
    code generation, for quicker runs), or "none" (`fn` itself: the compiled rows then time eager
    code; for smoke tests of the plumbing only). `mode` is inductor's alone."""
    if ctx.compile_backend == "none":
        return fn
    if ctx.compile_backend != "inductor":
        options.pop("mode", None)
    return torch.compile(fn, backend=ctx.compile_backend, **options)


def preset_config(ctx: BenchContext) -> Config:
    """The context's preset, its UNet and VAE set to the context's memory format."""
    cfg = get_preset(ctx.preset)
    channels_last = ctx.memory_format == "channels_last"
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, channels_last=channels_last),
                               vae=dataclasses.replace(cfg.vae, channels_last=channels_last))


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast runs natively here: a CUDA GPU with bf16, or a CPU with bf16 instructions
    (elsewhere it is emulated and only slower, so the cases leave it out unless asked)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def register_case(name: str, in_all: bool = True) -> Callable[[CaseFn], CaseFn]:
    """Decorator: register `fn(ctx) -> list[dict]` under `name` (names are unique). `in_all`
    False keeps a case out of `t2i-bench all` (a quality benchmark that trains for minutes)."""

    def register(fn: CaseFn) -> CaseFn:
        if name in CASES and CASES[name] is not fn:
            raise ValueError(f"bench case {name!r} is registered twice")
        CASES[name] = fn
        if not in_all:
            NOT_IN_ALL.add(name)
        return fn

    return register


def load_cases() -> dict[str, CaseFn]:
    """Import every module in bench/cases so that its cases register; a module that fails to
    import is remembered in IMPORT_ERRORS instead of hiding everyone else's cases."""
    import bench.cases as package

    for info in pkgutil.iter_modules(package.__path__):
        module = f"{package.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - reported to the user, other cases still run
            IMPORT_ERRORS[info.name] = f"{type(err).__name__}: {err}"
    return CASES


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call of `fn`, the device synchronised before and after: for a
    compiled variant's first call, what a user waits before the first result (tracing, code
    generation, CUDA-graph recording and one run)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summarize(seconds: list[float]) -> dict[str, Any]:
    """median / p10 / p90 / mean / min of per-call times in seconds."""
    ordered = sorted(seconds)
    return {
        "median_s": statistics.median(ordered),
        "p10_s": _quantile(ordered, 0.10),
        "p90_s": _quantile(ordered, 0.90),
        "mean_s": statistics.fmean(ordered),
        "min_s": ordered[0],
        "repeats": len(ordered),
    }


class _Timer:
    """Times one sample of `inner` calls: CUDA events on CUDA (GPU time), perf_counter elsewhere."""

    def __init__(self, device: torch.device, sync: bool):
        self.device, self.sync = device, sync
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[Any, Any, int]] = []

    def sample(self, fn: Callable[[], Any], inner: int) -> float | None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            self.pending.append((start, end, inner))
            return None  # read after one synchronize in `collect`
        if self.sync:
            _sync(self.device)
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        if self.sync:
            _sync(self.device)
        return (time.perf_counter() - begin) / inner

    def collect(self) -> list[float]:
        torch.cuda.synchronize(self.device)
        out = [start.elapsed_time(end) / 1e3 / inner for start, end, inner in self.pending]
        self.pending.clear()
        return out


def time_fn(fn: Callable[[], Any], *, ctx: BenchContext, warmup: int | None = None,
            repeats: int | None = None, sync: bool = True, inner: int = 1) -> dict[str, Any]:
    """Time `fn()` (no arguments): warm-up calls excluded, then `repeats` samples of `inner` calls
    each. Returns `summarize` of seconds per call."""
    return time_alternating({"fn": fn}, ctx=ctx, warmup=warmup, repeats=repeats, sync=sync,
                            inner=inner)["fn"]


def time_alternating(fns: dict[str, Callable[[], Any]], *, ctx: BenchContext,
                     warmup: int | None = None, repeats: int | None = None, sync: bool = True,
                     inner: int = 1) -> dict[str, dict[str, Any]]:
    """Time several functions interleaved (a round visits each once, the starting one rotating
    per round), so drift in clocks, caches and background load hits baselines and candidates
    alike. Returns name -> `summarize` stats."""
    warmup = ctx.warmup if warmup is None else warmup
    repeats = ctx.repeats if repeats is None else repeats
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    _sync(ctx.torch_device)
    timer = _Timer(ctx.torch_device, sync)
    samples: dict[str, list[float]] = {name: [] for name in names}
    order: list[str] = []
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            value = timer.sample(fns[name], inner)
            order.append(name)
            if value is not None:
                samples[name].append(value)
    if timer.cuda:
        for name, value in zip(order, timer.collect()):
            samples[name].append(value)
    return {name: summarize(values) for name, values in samples.items()}


# ----------------------------------------------------------------------------------------------
# Rows and ratios (FLOPs and MFU: bench/flops.py)
# ----------------------------------------------------------------------------------------------


def result_row(case: str, name: str, stats: dict[str, Any], **extras: Any) -> dict[str, Any]:
    """One output row: case, name, timing stats, then extras."""
    return {"case": case, "name": name, **stats, **extras}


def add_ratios(rows: list[dict], baseline: str, *, key: str = "ratio", group: str = "case",
               match: str = "name") -> list[dict]:
    """Within each set of rows sharing row[group], the baseline is the row whose row[match] is
    `baseline`; every other row gets row[key] = baseline median / its median (above 1: faster
    than the baseline) and row[key + "_vs"] naming the baseline. The rows must come from one run
    (see `time_alternating`)."""
    base = {row[group]: row for row in rows
            if row.get(match) == baseline and group in row and "median_s" in row}
    for row in rows:
        reference = base.get(row.get(group))
        if reference is not None and row is not reference and "median_s" in row:
            row[key] = reference["median_s"] / row["median_s"]
            row[key + "_vs"] = reference["name"]
    return rows


# ----------------------------------------------------------------------------------------------
# Environment and running
# ----------------------------------------------------------------------------------------------


def tf32_allowed() -> bool:
    """fp32 convolutions or matmuls may run on TF32 tensor cores (cuDNN allows it by default)."""
    return (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty.strip() else "")


def source_digest(root: Path = REPO_ROOT) -> str:
    """sha256 (first 12 hex digits) of the Python sources under t2i/ and bench/: path and bytes
    of each *.py file, in sorted order. It names the code that ran where git cannot (a copy of a
    working tree whose .git is stale or absent, as on a lent GPU machine): recompute it at a
    commit with `python -c "from bench.core import source_digest; print(source_digest())"`."""
    sha = hashlib.sha256()
    files = sorted(path for folder in ("t2i", "bench") for path in (root / folder).rglob("*.py"))
    for path in files:
        sha.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:12]


def environment(ctx: BenchContext | None = None) -> dict[str, Any]:
    """Where and how the numbers were measured."""
    device = ctx.torch_device if ctx else torch.device("cpu")
    env: dict[str, Any] = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else _cpu_name()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "source_digest": source_digest(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
    }
    if ctx is not None:
        env.update(dtype=ctx.dtype, compile=ctx.compile, preset=ctx.preset, quick=ctx.quick,
                   tf32_allowed=tf32_allowed(), cudnn_benchmark=torch.backends.cudnn.benchmark,
                   memory_format=ctx.memory_format)
    return env


def machine_slug(env: dict[str, Any]) -> str:
    """Short file-name-safe machine label, e.g. 'nvidia-h100-80gb-hbm3' or 'cpu2-amd-epyc-7b13'."""
    name = env["device_name"] if env["device"] == "cuda" else f"cpu{env['cpu_count']}-{env['device_name']}"
    name = re.sub(r"\((r|tm)\)|cpu @.*|processor", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:48]


def default_results_path(env: dict[str, Any], cases: list[str]) -> Path:
    label = cases[0] if len(cases) == 1 else "all" if len(cases) > 3 else "+".join(cases)
    return RESULTS_DIR / f"{label}-{machine_slug(env)}-{env['date'][:10]}.json"


def run_case(name: str, ctx: BenchContext) -> tuple[list[dict], dict[str, Any] | None]:
    """Run one case; with ctx.profile wrap it in torch.profiler and write a Chrome trace plus a
    top-kernels table into ctx.out_dir. A SkipCase or an exception becomes a row, not a crash."""
    fn = CASES[name]
    profile_info = None
    try:
        if ctx.profile:
            rows, profile_info = _profiled(name, fn, ctx)
        else:
            rows = fn(ctx)
    except SkipCase as err:
        rows = [{"case": name, "name": "-", "skipped": str(err)}]
    except Exception as err:  # noqa: BLE001 - one failing case must not hide the others
        traceback.print_exc()
        rows = [{"case": name, "name": "-", "error": f"{type(err).__name__}: {err}"}]
    return rows, profile_info


TOP_KERNELS = 25  # rows of a profile's table and of its JSON "top" list


def _profiled(name: str, fn: CaseFn, ctx: BenchContext) -> tuple[list[dict], dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if ctx.torch_device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, record_shapes=False) as prof:
        rows = fn(ctx)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    trace = ctx.out_dir / f"trace-{name}.json"
    prof.export_chrome_trace(str(trace))
    on_cuda = ctx.torch_device.type == "cuda"
    sort_key = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_key, row_limit=TOP_KERNELS)
    (ctx.out_dir / f"top-kernels-{name}.txt").write_text(table)
    top = []
    events = sorted(prof.key_averages(),
                    key=lambda e: getattr(e, "self_device_time_total" if on_cuda else "self_cpu_time_total", 0),
                    reverse=True)
    for event in events[:TOP_KERNELS]:
        self_us = getattr(event, "self_device_time_total" if on_cuda else "self_cpu_time_total", 0)
        top.append({"name": event.key, "self_us": float(self_us), "calls": int(event.count)})
    return rows, {"trace": str(trace), "table": table, "top": top}


def compile_phase_times(min_s: float = 0.05) -> dict[str, float]:
    """Seconds this process has spent in each torch.compile phase so far (dynamo's tracing,
    AOTAutograd, inductor's lowering and code generation, waiting for Triton/C++ compiles), as
    torch's own metrics give them, phases under `min_s` left out: where a slow compile's time
    goes. Empty when nothing was compiled, or when this torch keeps no such metrics (a private
    API: `torch._dynamo.utils.compile_times`)."""
    try:
        from torch._dynamo.utils import compile_times
        names, values = compile_times(repr="csv", aggregate=True)
        times = {name: float(value) for name, value in zip(names, values)}
    except Exception:  # noqa: BLE001 - diagnostics only: another torch may not have it
        return {}
    return {name: s for name, s in times.items() if s >= min_s}


def report(ctx: BenchContext, rows: list[dict], profiles: dict[str, Any],
           env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON document written by --json / --save; `env` as taken when the run started (the
    commit and date of a long run are those it began with)."""
    context = asdict(ctx)
    context["out_dir"] = str(ctx.out_dir)
    return {"environment": env or environment(ctx), "context": context, "results": rows,
            "profiles": {name: {k: v for k, v in info.items() if k != "table"}
                         for name, info in profiles.items()},
            "compile_times": compile_phase_times()}


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write `document` through a temporary file and a rename: a kill mid-write (the GPU check's
    timeouts) leaves the previous complete file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    os.replace(tmp, path)
