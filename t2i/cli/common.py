"""Shared click plumbing: user errors are one clear line and exit status 2, never a traceback."""

from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import torch

from t2i.config import ConfigError
from t2i.data.errors import DataError
from t2i.models.io import WeightsError
from t2i.train.run import RunFolderError
from t2i.train import signals


class UserError(click.ClickException):
    """Bad input from the user (path, preset, option): printed as one line, exit status 2."""

    exit_code = 2


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ConfigError / DataError / WeightsError / RunFolderError / FileNotFoundError (raised
    for user input: options, paths, data sources, weights files that are damaged or of another
    config, a run folder in use or already holding a run) into UserError: one `Error:` line,
    exit status 2, in every CLI."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError:
            raise
        except (ConfigError, DataError, WeightsError, RunFolderError, FileNotFoundError) as err:
            raise UserError(str(err)) from err

    return exit_on_interrupt(wrapper)


def exit_on_interrupt(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Ctrl-C (SIGINT) exits with status 130 and SIGTERM with 143, after one line on stderr,
    instead of click's "Aborted!" and 1; SIGTERM raises like Ctrl-C while `fn` runs (see
    t2i/train/signals.py). Raises click.exceptions.Exit with that status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with signals.immediate_stop():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as err:
            signum = signals.signum_of(err)
            click.echo(f"\ninterrupted by {signals.describe(signum)}", err=True)
            raise click.exceptions.Exit(signals.exit_status(signum)) from None

    return wrapper


# ----------------------------------------------------------------------------------------------
# Option values: devices, finite numbers, output folders, CPU threads
# ----------------------------------------------------------------------------------------------


def one_line_usage(call: Callable[[], Any]) -> Any:
    """`call()`, with a click usage error (a bad, missing or unknown option, value or command)
    printed as one line, `Error: ...` naming it, without the usage text; exit status 2."""
    try:
        return call()
    except click.UsageError as err:
        # click prints the usage and a hint only when the error has a context; its message for
        # a missing choice option lists the choices one per line
        message = " ".join(err.format_message().split())
        # a glob the shell expanded: extra .tar arguments, or one taken as encode's OUT folder
        if ".tar" in message and ("unexpected extra argument" in message or "is a file" in message):
            message += (" (a shell glob expands into many arguments: quote it, as in "
                        "'shards/data_*.tar', or give the folder or a comma-separated list)")
        raise click.UsageError(message) from None


class OneLineCommand(click.Command):
    """A click command whose usage errors are one line (see one_line_usage)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return one_line_usage(lambda: super(OneLineCommand, self).parse_args(ctx, args))


class OneLineGroup(click.Group):
    """A click group whose usage errors, and its subcommands', are one line."""

    command_class = OneLineCommand

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return one_line_usage(lambda: super(OneLineGroup, self).parse_args(ctx, args))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> Any:
        return one_line_usage(lambda: super(OneLineGroup, self).resolve_command(ctx, args))


class FiniteFloat(click.FloatRange):
    """A float option within [min, max] that refuses inf and nan (which a range lets through)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def pick_device(requested: str | None) -> torch.device:
    """The --device of every CLI (t2i-train, t2i-sample, t2i-eval, t2i-bench): cpu, cuda or
    cuda:N (None: cuda when available); anything else is a UserError, and so is cuda:N under
    torchrun (WORLD_SIZE > 1), where each process takes the GPU of its LOCAL_RANK."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested}: use cpu, cuda or cuda:N")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if device.type == "cuda" and device.index is not None and processes > 1:
        raise UserError(f"--device {requested} under torchrun would put all {processes} processes "
                        f"on one GPU: pass --device cuda (each process takes its LOCAL_RANK's)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA was requested but no CUDA GPU is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {requested}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def output_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of a folder option that is written to: the path and its nearest existing
    parent must be folders, and that parent writable, so a bad --out fails before any work."""
    if value is None:
        return value
    path = Path(value).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise click.BadParameter(f"{str(existing)!r} is a file, not a folder", ctx, param)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{str(existing)!r} is not writable", ctx, param)
    return value


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cpusets), capped by a cgroup v2
    CPU quota (docker --cpus) where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores or 1, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores or 1)


def choose_threads(cores: int, workers: int, requested: int | None = None,
                   omp_num_threads: str | None = None) -> int:
    """Intra-op CPU threads for torch: `requested` (--threads), else OMP_NUM_THREADS when it is
    a positive number, else the usable cores less one per DataLoader worker (which run in their
    own processes), at least 1. More threads than free cores make every kernel wait at its
    barrier for a descheduled thread: 10-20x slower on a busy machine."""
    if requested is not None:
        return requested
    first = (omp_num_threads or "").split(",")[0].strip()
    if first.isdigit() and int(first) > 0:
        return int(first)
    return max(1, cores - workers)


def set_threads(requested: int | None, workers: int = 0) -> int:
    """The one place t2i sets torch's intra-op thread count (see choose_threads); returns it."""
    threads = choose_threads(available_cores(), workers, requested,
                             os.environ.get("OMP_NUM_THREADS"))
    torch.set_num_threads(threads)
    return threads


def progress_bar(total: int | None = None, unit: str = "img", enabled: bool | None = None,
                 **options: Any):
    """The CLIs' tqdm bar (rate and ETA) on stderr, sized to the terminal. `enabled` None: shown
    when stderr is a terminal; False: hidden. Use it as a context manager, or pass `iterable=`."""
    import sys

    from tqdm import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=None if enabled is None else not enabled, **options)


def check_writable(out: str, option: str = "--out") -> None:
    """Refuse an `option` folder that cannot be written, before any work and creating nothing: a
    folder is made and removed in it, or in its nearest existing parent (click's output_dir
    callback has checked those are folders). Raises UserError naming `option` (e.g.
    /proc/x, a read-only disk)."""
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".t2i-write-check-", dir=existing))
    except OSError as err:
        raise UserError(f"{option} {out!r}: cannot create files there "
                        f"({err.strerror or err})") from err


def check_no_clash(out: str, names: Iterable[str], overwrite: bool, option: str = "--out"
                   ) -> None:
    """Nothing is lost: refuse, before any work, an `option` folder that already holds one of
    `names` (the files this command would write there, in the order it writes them), unless
    `overwrite`. Raises UserError naming `option` and the first such file."""
    if overwrite:
        return
    clash = next((name for name in names if os.path.lexists(Path(out) / name)), None)
    if clash is not None:
        raise UserError(f"{option} {out!r} already holds {clash}: choose another {option}, or "
                        f"pass --overwrite to replace the files this call writes")
