"""`t2i-bench CASE [CASE...] | all`: run benchmark cases, print a table, optionally write JSON.

Also `python -m bench ...`. Bad input (unknown case, preset, device, dtype) is one line, exit 2.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

from bench import core
from bench.tables import format_tables
from t2i.cli.common import OneLineCommand, pick_device, set_threads


BACKENDS = ["inductor", "aot_eager", "eager", "none"]


class BenchUsageError(click.ClickException):
    """Bad command-line input: one clear line, exit status 2."""

    exit_code = 2


def resolve_device(device: str) -> str:
    """--device: auto (cuda when available), cpu, cuda or cuda:N, else one line and exit 2."""
    return str(pick_device(None if device == "auto" else device))


def _check_resolution(preset: str, resolution: int | None) -> None:
    """--resolution must suit the preset's models (a multiple of its VAE x UNet factor)."""
    from t2i.config import ConfigError, apply_overrides, get_preset

    if resolution is not None:
        try:
            apply_overrides(get_preset(preset), [f"data.resolution={resolution}"])
        except ConfigError as err:
            raise BenchUsageError(f"--resolution {resolution}: {err}") from err


def _select(cases: tuple[str, ...]) -> list[str]:
    known = core.load_cases()
    if not cases:
        raise BenchUsageError(f"name a case or 'all'; known cases: {', '.join(sorted(known))}")
    if "all" in cases:
        return sorted(set(known) - core.NOT_IN_ALL)
    unknown = [name for name in cases if name not in known]
    if unknown:
        broken = "".join(f"; module bench/cases/{m}.py failed to import ({e})"
                         for m, e in core.IMPORT_ERRORS.items())
        raise BenchUsageError(f"unknown bench case {unknown[0]!r}; known cases: "
                              f"{', '.join(sorted(known)) or '(none)'}{broken}")
    return list(dict.fromkeys(cases))


def compile_label(ctx: core.BenchContext) -> str:
    """"off", "on" (inductor), or "on (backend aot_eager)" and the like: what compiled rows mean."""
    if not ctx.compile:
        return "off"
    return "on" if ctx.compile_backend == "inductor" else f"on (backend {ctx.compile_backend})"


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("cases", nargs=-1)
@click.option("--preset", default="tiny", show_default=True, help="Config preset the model cases size themselves by.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Also time torch.compile'd variants (eager is always timed as the baseline).")
@click.option("--repeats", type=click.IntRange(min=1), default=None, help="Timed samples per variant [20; quick: 5].")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed calls first [3; quick: 1].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: torch's choice). Use 1 on a shared or busy CPU.")
@click.option("--resolution", type=click.IntRange(min=8), default=None,
              help="Image side for unet / train-step / sample (default: the preset's).")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch for train-step / sample (default: per case and device).")
@click.option("--compile-backend", type=click.Choice(BACKENDS), default="inductor", show_default=True,
              help="aot_eager / eager: capture without code generation; none: no compiling "
                   "(smoke runs of the plumbing).")
@click.option("--slow-compile", is_flag=True,
              help="Also compile where inductor needs many minutes: the train-step cases on a CPU "
                   "(C++ code generation for a whole forward+backward: ~10 min on 2 cores).")
@click.option("--cudnn-benchmark", is_flag=True,
              help="torch.backends.cudnn.benchmark on: cuDNN autotunes each convolution shape.")
@click.option("--memory-format", type=click.Choice(core.MEMORY_FORMATS), default="channels_last",
              show_default=True, help="Activation layout of the UNet and VAE (NHWC or NCHW), as "
                                      "unet.channels_last / vae.channels_last set it.")
@click.option("--fp32-weights", is_flag=True,
              help="sample: keep fp32 UNet weights under bf16 autocast on CUDA (default: bf16 "
                   "weights, as t2i-sample holds them).")
@click.option("--latents", is_flag=True,
              help="train-step: batches of stored VAE moments, as from latent shards (t2i-data "
                   "encode): the VAE encode leaves the step, as in the 2M recipe.")
@click.option("--quick", is_flag=True, help="Smallest sizes and few repeats (smoke runs, tests).")
@click.option("--profile", is_flag=True, help="torch.profiler Chrome trace + top kernels by self time into --out.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("bench/out"), show_default=True, help="Folder for profiles.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write environment, context and result rows as JSON here.")
@click.option("--save", is_flag=True, help="Also write JSON to bench/results/<cases>-<machine>-<date>.json.")
def main(cases: tuple[str, ...], preset: str, device: str, dtype: str, compile_: bool,
         repeats: int | None, warmup: int | None, threads: int | None, resolution: int | None,
         batch: int | None, compile_backend: str, slow_compile: bool, cudnn_benchmark: bool,
         memory_format: str, fp32_weights: bool, latents: bool, quick: bool, profile: bool, out_dir: Path,
         json_path: Path | None, save: bool) -> None:
    """Time t2i's hot loops. CASES: case names, or 'all'."""
    from t2i.config import PRESETS

    if preset not in PRESETS:
        raise BenchUsageError(f"unknown preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    _check_resolution(preset, resolution)
    names = _select(cases)
    if threads is not None:
        set_threads(threads)
    ctx = core.BenchContext(
        preset=preset, device=resolve_device(device), dtype=dtype, compile=compile_,
        repeats=repeats if repeats is not None else (5 if quick else 20),
        warmup=warmup if warmup is not None else (1 if quick else 3),
        quick=quick, profile=profile, out_dir=out_dir, resolution=resolution, batch=batch,
        compile_backend=compile_backend, slow_compile=slow_compile,
        cudnn_benchmark=cudnn_benchmark, memory_format=memory_format, fp32_weights=fp32_weights,
        latents=latents,
    )
    torch.backends.cudnn.benchmark = cudnn_benchmark
    env = core.environment(ctx)
    click.echo(f"# {env['device_name']} | torch {env['torch']} | {ctx.dtype} | "
               f"compile={compile_label(ctx)} | preset {ctx.preset} | "
               f"{env['git_commit'][:12]} | source {env['source_digest']}")
    for module, error in core.IMPORT_ERRORS.items():
        click.echo(f"warning: bench/cases/{module}.py failed to import: {error}", err=True)
    rows: list[dict] = []
    profiles: dict = {}
    targets = ([json_path] if json_path else []) + ([core.default_results_path(env, names)] if save else [])
    for name in names:
        started = time.perf_counter()
        case_rows, profile_info = core.run_case(name, ctx)
        click.echo(f"# {name}: {time.perf_counter() - started:.0f} s", err=True)  # progress
        rows += case_rows
        if profile_info:
            profiles[name] = profile_info
            click.echo(f"\n## profile {name}: trace {profile_info['trace']}\n{profile_info['table']}")
        for target in targets:  # after every case: a run stopped by a timeout keeps its rows
            core.write_json(target, core.report(ctx, rows, profiles, env))
    click.echo(format_tables(rows))
    for target in targets:
        click.echo(f"wrote {target}")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
