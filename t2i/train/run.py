"""Run folders, metrics logging and the progress bar.

A run lives in `runs/<preset>-<data>-<timestamp>/` (or `--out`):

    config.json        the resolved config; the run is reproducible from it
    metrics.jsonl      one JSON object per log interval and stage
    tensorboard/       the same scalars as TensorBoard events (only when tensorboard is installed)
    samples/           PNG grids written every --sample-every steps
    vae/ unet/         checkpoints of each stage (see checkpoint.py)
    vae.safetensors    the finished stage-1 autoencoder, with its measured latent scale
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from t2i.config import Config, config_from_json, to_json


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

    def read_config(self) -> Config:
        return config_from_json(self.config_path.read_text())

    def log(self, record: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


def open_tensorboard(log_dir: Path) -> Any | None:
    """A TensorBoard SummaryWriter, or None when the tensorboard package is not installed
    (it is optional: metrics.jsonl always has the same numbers)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir))


SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "skipped", "skipped_total")


def write_tensorboard(writer: Any | None, record: dict[str, Any]) -> None:
    """One metrics record as scalars `<stage>/<name>` at its step (no-op without a writer)."""
    if writer is None:
        return
    stage, step = record["stage"], record["step"]
    for name in SCALARS:
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
    """The most recently modified run folder under `root` (for --resume auto)."""
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if (p / "config.json").is_file()]
    return max(runs, key=lambda p: (p / "config.json").stat().st_mtime) if runs else None


def format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar with loss, throughput and ETA (stderr; plain lines when not a TTY)."""

    def __init__(self, label: str, start: int, total: int, stream: TextIO | None = None,
                 enabled: bool = True):
        self.label, self.start, self.total = label, start, total
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, loss: float, samples_per_s: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        width = 24
        filled = int(width * step / max(self.total, 1))
        line = (f"{self.label:5s} {step:>7d}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                f"loss {loss:.4f}  {samples_per_s:7.1f} img/s  "
                f"elapsed {format_seconds(elapsed)}  ETA {format_seconds(eta)}")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
