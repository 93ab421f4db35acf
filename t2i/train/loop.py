"""The training loop: one flat `fit` used by both stages, read top to bottom.

`fit` pulls batches, calls the stage's `train_step(state, batch) -> (state, metrics)`, and at
intervals logs (the only host syncs), writes sample grids, and saves checkpoints. Ctrl-C saves a
checkpoint and exits cleanly; too many non-finite steps in a row stop the run with a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from t2i.train import distributed
from t2i.train.checkpoint import save_checkpoint
from t2i.train.run import Progress, Run
from t2i.train.state import TrainState


class TrainingError(RuntimeError):
    """A run cannot continue (diverged, too many bad samples); the message says why."""


class Interrupted(Exception):
    """Ctrl-C: a checkpoint was saved at `path`."""

    def __init__(self, path: Path | None, step: int):
        super().__init__(f"interrupted at step {step}")
        self.path, self.step = path, step


@dataclass(frozen=True)
class LoopSettings:
    stage: str
    total_steps: int
    global_batch: int
    log_every: int
    sample_every: int
    save_every: int
    keep_last: int
    max_nonfinite: int
    show_progress: bool = True


def summarize_interval(history: list[dict[str, torch.Tensor]], buckets: int = 10,
                       num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Means over a log interval (one host sync); per-timestep-bucket loss when t is known."""
    loss = torch.stack([m["loss"] for m in history]).float()
    out = {"loss": loss.mean().item(),
           "grad_norm": torch.stack([m["grad_norm"] for m in history]).float().mean().item(),
           "skipped_flags": [int(m["skipped"]) for m in history]}
    if "t" in history[0]:
        t = torch.cat([m["t"] for m in history])
        per_sample = torch.cat([m["per_sample_loss"] for m in history]).float()
        bucket = (t * buckets // num_train_timesteps).clamp(max=buckets - 1)
        sums = torch.zeros(buckets).index_add_(0, bucket.cpu(), per_sample.cpu())
        counts = torch.zeros(buckets).index_add_(0, bucket.cpu(), torch.ones_like(per_sample).cpu())
        out["loss_by_t"] = [round(v, 6) if c > 0 else None
                            for v, c in zip((sums / counts.clamp(min=1)).tolist(), counts.tolist())]
    return out


def fit(state: TrainState, train_step: Callable, batches: Iterator[dict], settings: LoopSettings,
        run: Run, world: distributed.World, checkpoint_extra: Callable[[], dict],
        checkpoint_metadata: dict[str, str], lr_of: Callable[[int], float],
        on_sample: Callable[[TrainState], None] | None = None,
        bad_samples: Callable[[], dict] = dict) -> TrainState:
    """Train `state` to `settings.total_steps`; returns the final state (checkpoint saved)."""
    stage_dir = run.stage_dir(settings.stage)
    progress = Progress(settings.stage, state.step, settings.total_steps,
                        enabled=settings.show_progress and world.is_main)
    history: list[dict[str, torch.Tensor]] = []
    nonfinite_run, last_saved = 0, None
    t_log, step_log = time.perf_counter(), state.step

    def save() -> Path | None:
        if not world.is_main:
            return None
        return save_checkpoint(stage_dir, state, checkpoint_extra(), checkpoint_metadata,
                               settings.keep_last)

    try:
        while state.step < settings.total_steps:
            batch = next(batches)
            state, metrics = train_step(state, batch)
            history.append(metrics)
            at_end = state.step == settings.total_steps
            if state.step % settings.log_every == 0 or at_end:
                summary = summarize_interval(history)
                for flag in summary.pop("skipped_flags"):
                    nonfinite_run = nonfinite_run + 1 if flag else 0
                elapsed = time.perf_counter() - t_log
                rate = (state.step - step_log) * settings.global_batch / max(elapsed, 1e-9)
                record = {"stage": settings.stage, "step": state.step, "lr": lr_of(state.step - 1),
                          "samples_per_s": round(rate, 2),
                          "skipped_total": int(sum(int(m["skipped"]) for m in history)),
                          "nonfinite_in_row": nonfinite_run, "bad_samples": bad_samples(),
                          **summary, "time": time.time()}
                if world.is_main:
                    run.log(record)
                progress.update(state.step, record["loss"], rate)
                history, t_log, step_log = [], time.perf_counter(), state.step
                if nonfinite_run >= settings.max_nonfinite:
                    raise TrainingError(
                        f"{settings.stage}: the loss was non-finite for {nonfinite_run} steps in a "
                        f"row (up to step {state.step}); no update was applied on those steps. "
                        f"Lower --lr, raise --warmup or use --precision fp32/bf16; the last good "
                        f"checkpoint is in {stage_dir}")
            if on_sample and settings.sample_every and (state.step % settings.sample_every == 0
                                                        or at_end) and world.is_main:
                on_sample(state)
            if (settings.save_every and state.step % settings.save_every == 0) or at_end:
                last_saved = save()
    except KeyboardInterrupt:
        progress.close()
        path = save() if state.step > 0 else None
        raise Interrupted(path, state.step) from None
    finally:
        progress.close()
    distributed.barrier(world)
    return state
