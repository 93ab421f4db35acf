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
from t2i.train.checkpoint import latest_checkpoint, save_checkpoint
from t2i.train.run import Progress, Run, open_tensorboard, write_tensorboard
from t2i.train.state import TrainState


class TrainingError(RuntimeError):
    """A run cannot continue (diverged, too many bad samples); the message says why."""


class OutOfMemory(Exception):
    """The device ran out of memory at `step`; nothing was saved after `last_checkpoint`."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        super().__init__(f"out of memory at step {step}")
        self.step, self.last_checkpoint = step, last_checkpoint


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


def summarize_interval(history: list[dict[str, torch.Tensor]], world: distributed.World,
                       buckets: int = 10, num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Means over a log interval and over all ranks (one host sync, one all-reduce); the
    per-timestep-bucket loss when t is known."""
    per_sample = torch.cat([m["per_sample_loss"] for m in history]).float()  # (n,)
    sums = torch.stack([per_sample.sum(), torch.tensor(float(per_sample.numel()),
                                                       device=per_sample.device)])
    if "t" in history[0]:
        t = torch.cat([m["t"] for m in history])
        bucket = (t * buckets // num_train_timesteps).clamp(max=buckets - 1)
        by_t = torch.zeros(2, buckets, device=per_sample.device)
        by_t[0].index_add_(0, bucket, per_sample)
        by_t[1].index_add_(0, bucket, torch.ones_like(per_sample))
        sums = torch.cat([sums, by_t.flatten()])
    totals = distributed.all_sum(world, sums).tolist()
    out = {"loss": totals[0] / max(totals[1], 1.0),
           "grad_norm": torch.stack([m["grad_norm"] for m in history]).float().mean().item(),
           "skipped_flags": [int(m["skipped"]) for m in history]}
    if len(totals) > 2:
        bucket_sums, counts = totals[2:2 + buckets], totals[2 + buckets:]
        out["loss_by_t"] = [round(v / c, 6) if c > 0 else None for v, c in zip(bucket_sums, counts)]
    return out


def fit(state: TrainState, train_step: Callable, batches: Iterator[dict], settings: LoopSettings,
        run: Run, world: distributed.World, checkpoint_extra: Callable[[], dict],
        checkpoint_metadata: dict[str, str], lr_of: Callable[[int], float],
        on_sample: Callable[[TrainState], None] | None = None,
        bad_samples: Callable[[], dict] = dict) -> TrainState:
    """Train `state` to `settings.total_steps`; returns the final state (checkpoint saved).

    Under torchrun every rank runs this loop in lockstep; rank 0 alone writes metrics,
    TensorBoard, grids and checkpoints, but every rank calls `checkpoint_extra` at a save (it
    may gather the data positions of all ranks, a collective)."""
    stage_dir = run.stage_dir(settings.stage)
    progress = Progress(settings.stage, state.step, settings.total_steps,
                        enabled=settings.show_progress and world.is_main)
    board = open_tensorboard(run.dir / "tensorboard") if world.is_main else None
    history: list[dict[str, torch.Tensor]] = []
    nonfinite_run, skipped_total = 0, 0
    t_log, step_log = time.perf_counter(), state.step

    def save() -> Path | None:
        extra = checkpoint_extra()  # on every rank: may be a collective
        if not world.is_main:
            return None
        return save_checkpoint(stage_dir, state, extra, checkpoint_metadata, settings.keep_last)

    try:
        while state.step < settings.total_steps:
            batch = next(batches)
            state, metrics = train_step(state, batch)
            history.append(metrics)
            at_end = state.step == settings.total_steps
            if state.step % settings.log_every == 0 or at_end:
                summary = summarize_interval(history, world)
                flags = summary.pop("skipped_flags")
                for flag in flags:
                    nonfinite_run = nonfinite_run + 1 if flag else 0
                skipped_total += sum(flags)
                elapsed = time.perf_counter() - t_log
                rate = (state.step - step_log) * settings.global_batch / max(elapsed, 1e-9)
                record = {"stage": settings.stage, "step": state.step, "lr": lr_of(state.step - 1),
                          "samples_per_s": round(rate, 2), "skipped": sum(flags),
                          "skipped_total": skipped_total, "nonfinite_in_row": nonfinite_run,
                          "bad_samples": bad_samples(), **summary, "time": time.time()}
                if world.is_main:
                    run.log(record)
                    write_tensorboard(board, record)
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
                save()
    except KeyboardInterrupt:
        progress.close()
        raise Interrupted(save_on_interrupt(state, save, world, stage_dir), state.step) from None
    except torch.OutOfMemoryError:
        # The weights may be half-updated: save nothing, keep the last good checkpoint.
        raise OutOfMemory(state.step, latest_checkpoint(stage_dir)) from None
    finally:
        progress.close()
        if board is not None:
            board.close()
    distributed.barrier(world)
    return state


def save_on_interrupt(state: TrainState, save: Callable[[], Path | None],
                      world: distributed.World, stage_dir: Path) -> Path | None:
    """Ctrl-C: save the current step. Under torchrun the ranks stop at different points, so a
    collective could hang: keep the last periodic checkpoint instead."""
    if world.distributed:
        return latest_checkpoint(stage_dir) if world.is_main else None
    return save() if state.step > 0 else None
