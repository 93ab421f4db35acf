"""Run folders, metrics logging and the progress bar.

A run lives in `runs/<preset>-<data>-<timestamp>/` (or `--out`):

    .lock              held (fcntl.flock) by the trainer using the folder; never deleted
    config.json        the resolved config, written once a start or resume has succeeded
    metrics.jsonl      one JSON object per log interval and stage, and one per validation
                       loss ("kind": "val", see val_hook.py)
    tensorboard/       the same scalars as TensorBoard events (only when tensorboard is installed)
    samples/           PNG grids written every --sample-every steps
    vae/ unet/         checkpoints of each stage (see t2i/models/checkpoints.py)
    vae.safetensors    the finished stage-1 autoencoder, with its measured latent scale

A folder "holds a run" once it has a config.json, a checkpoint or a vae.safetensors: a new run
is never started in it, and a second trainer cannot take its lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from t2i.config import Config, ConfigError, config_from_json, to_json
from t2i.models.checkpoints import holds_checkpoints

STAGES = ("vae", "unet")
LOCK = ".lock"


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked: another trainer holds it, or it already holds
    a run and no resume was asked for; the message says what to do."""


@dataclass(frozen=True)
class Run:
    dir: Path

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    def stage_dir(self, stage: str) -> Path:
        return self.dir / stage

    @property
    def vae_weights(self) -> Path:
        return self.dir / "vae.safetensors"

    @property
    def samples_dir(self) -> Path:
        return self.dir / "samples"

    def write_config(self, cfg: Config) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.config_path.with_suffix(".json.tmp")
        tmp.write_text(to_json(cfg) + "\n")
        tmp.replace(self.config_path)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.jsonl"

    def holds_run(self) -> bool:
        """A config.json, a trained VAE or any checkpoint: something a new run would destroy."""
        return (self.config_path.is_file() or self.vae_weights.is_file()
                or any(holds_checkpoints(self.stage_dir(s)) for s in STAGES))

    def read_config(self) -> Config:
        """The run's config.json. Raises ConfigError when it is missing or damaged (the folder
        is never silently treated as a new run)."""
        if not self.config_path.is_file():
            raise ConfigError(f"{str(self.dir)!r} holds a run but no config.json; restore it (each "
                              f"checkpoint's model.safetensors holds the config in its `config` "
                              f"metadata) or pass another --out")
        try:
            return config_from_json(self.config_path.read_text())
        except (ValueError, TypeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{str(self.config_path)!r} is damaged ({err}); restore it (each "
                              f"checkpoint's model.safetensors holds the config in its `config` "
                              f"metadata)") from err

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def cut_metrics(self, stage: str, step: int) -> int:
        """Drop `stage`'s metrics records after `step` (a resume redoes those steps) and lines
        cut short by a kill; rewrites metrics.jsonl atomically. Returns the lines dropped."""
        if not self.metrics_path.is_file():
            return 0
        kept = []
        lines = self.metrics_path.read_text().splitlines()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not (record.get("stage") == stage and record.get("step", 0) > step):
                kept.append(line)
        if len(kept) < len(lines):
            tmp = self.metrics_path.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.metrics_path)
        return len(lines) - len(kept)


@contextlib.contextmanager
def locked(run_dir: Path, busy_hint: str = "wait for it to end or pass another --out"
           ) -> Iterator[None]:
    """Hold an exclusive lock on `run_dir` (flock on RUN/.lock, created with the folder) until
    the block ends or the process dies. Raises RunFolderError, ending with `busy_hint`, when
    another process holds it, or when the folder cannot be made or written (read-only)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise RunFolderError(f"{str(run_dir)!r} is not writable ({err.strerror or err}); the "
                             f"run folder must be: copy it somewhere writable to continue it"
                             ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(f"{str(run_dir)!r} is in use by another trainer ({holder}); "
                             f"{busy_hint}") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race)


def open_tensorboard(log_dir: Path) -> Any | None:
    """A TensorBoard SummaryWriter, or None when the tensorboard package is not installed
    (it is optional: metrics.jsonl always has the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "skipped", "skipped_total")
# stage-1 loss terms (t2i/train/gan.py), written when a record has them
OPTIONAL_SCALARS = ("rec_loss", "lpips", "gan_g", "gan_d", "adaptive_weight", "logits_real",
                    "logits_fake", "disc_grad_norm")


def write_tensorboard(writer: Any | None, record: dict[str, Any]) -> None:
    """One metrics record as scalars `<stage>/<name>` at its step (no-op without a writer)."""
    if writer is None:
        return
    stage, step = record["stage"], record["step"]
    if record.get("kind") == "val":  # a validation record (val_hook.py): val_loss, per t
        writer.add_scalar(f"{stage}/val_loss", record["val_loss"], step)
        for t, value in zip(record["val_timesteps"], record["val_loss_by_t"]):
            writer.add_scalar(f"{stage}/val_loss_by_t/{t}", value, step)
        writer.flush()
        return
    for name in SCALARS:
        writer.add_scalar(f"{stage}/{name}", record[name], step)
    for name in OPTIONAL_SCALARS:
        if name in record:
            writer.add_scalar(f"{stage}/{name}", record[name], step)
    writer.add_scalar(f"{stage}/bad_samples", record["bad_samples"].get("bad", 0), step)
    for i, value in enumerate(record.get("loss_by_t") or []):
        if value is not None:
            writer.add_scalar(f"{stage}/loss_by_t/{i}", value, step)
    writer.flush()


def data_label(source: str) -> str:
    """A short folder-name label for a data source."""
    if source == "shapes":
        return "shapes"
    label = source.rstrip("/").split("/")[-1] or "data"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40]


def new_run_dir(cfg: Config, root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{cfg.preset}-{data_label(cfg.data.source)}-{stamp}"


def newest_run(root: Path) -> Path | None:
    """The most recently used folder under `root` that holds a run (for --resume auto); one
    without a config.json counts too, so that resuming it is an error, not a new run."""
    if not root.is_dir():
        return None
    runs = [Run(p) for p in root.iterdir() if p.is_dir() and Run(p).holds_run()]

    def used(run: Run) -> float:
        return (run.config_path if run.config_path.is_file() else run.dir).stat().st_mtime

    return max(runs, key=used).dir if runs else None


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar with loss, throughput and ETA (stderr; plain lines when not a TTY).

    The ETA leaves out the time to the first update, which holds torch.compile's compile and
    the first batches' warm-up (minutes with `train.compile`), and counts everything after it,
    sample grids and saves included: from the second update on it is the remaining steps times
    the seconds per step since the first update; at the first update, the remaining samples
    over the reported rate. `clock` (seconds) is for tests."""

    def __init__(self, label: str, start: int, total: int, global_batch: int,
                 stream: TextIO | None = None, enabled: bool = True,
                 clock: Callable[[], float] = time.perf_counter):
        self.label, self.start, self.total, self.global_batch = label, start, total, global_batch
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.clock = clock
        self.t0 = clock()
        self.anchor: tuple[int, float] | None = None  # (step, time) of the first update
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def eta_s(self, step: int, samples_per_s: float, now: float) -> float:
        remaining = self.total - step
        if self.anchor is None or step <= self.anchor[0]:
            return remaining * self.global_batch / max(samples_per_s, 1e-9)
        anchor_step, anchor_time = self.anchor
        return (now - anchor_time) / (step - anchor_step) * remaining

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        now = self.clock()
        eta = self.eta_s(step, samples_per_s, now)
        self.anchor = self.anchor or (step, now)
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (f"{self.label:5s} {step:>7d}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                f"loss {loss:.4f}  {samples_per_s:7.1f} img/s  "
                f"elapsed {format_seconds(now - self.t0)}  ETA {format_seconds(eta)}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
