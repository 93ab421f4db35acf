"""The training loop: one flat `fit` used by both stages, read top to bottom.

`fit` pulls batches, calls the stage's `train_step(state, batch) -> (state, metrics)`, and at
intervals logs, writes sample grids, and saves checkpoints. A step has no host sync: the
consecutive non-finite count is kept on the device and read only at a check (`poll`), at every
log step and at the first step where the count could have reached `max_nonfinite` (it grows
by at most 1 a step, so after reading c the next read is max_nonfinite - c steps later: every
max_nonfinite steps while healthy). So the run stops at exactly the step where the count
reaches the limit, not at the next log interval. Saves and logs sync too.

Ctrl-C and SIGTERM (signals.py) stop the run at a step boundary with a checkpoint saved there:
in one process after the current step, under torchrun at the next check, where every rank
learns that some rank was signalled and all save the same step together. A second signal in
one process stops at once, keeping the last checkpoint. Non-finite weights are never saved.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from t2i.data.loader import merged_stats
from t2i.train import distributed, signals
from t2i.train.checkpoint import latest_checkpoint, save_checkpoint
from t2i.train.run import Progress, Run, open_tensorboard, write_tensorboard
from t2i.train.state import TrainState, nonfinite_weights


class TrainingError(RuntimeError):
    """A run cannot continue (diverged, too many bad samples); the message says why."""


class OutOfMemory(Exception):
    """The device ran out of memory at `step`; nothing was saved after `last_checkpoint`."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        super().__init__(f"out of memory at step {step}")
        self.step, self.last_checkpoint = step, last_checkpoint


class Interrupted(Exception):
    """Stopped by signal `signum` after step `step`. `saved`: a checkpoint of that step is at
    `path`; otherwise `path` is the last checkpoint kept (None: there is none)."""

    def __init__(self, path: Path | None, step: int, signum: int = signal.SIGINT,
                 saved: bool = True):
        super().__init__(f"interrupted by {signals.describe(signum)} at step {step}")
        self.path, self.step, self.signum, self.saved = path, step, signum, saved


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
    val_every: int = 0  # steps between calls of fit's on_validate (0: never)


@dataclass(frozen=True)
class LoopCounters:
    """Counts that survive a resume: stored in every checkpoint's trainer.pt under "loop"."""

    nonfinite_in_row: int = 0  # consecutive skipped (non-finite) steps up to the checkpoint
    skipped_total: int = 0

    def to_extra(self) -> dict[str, dict[str, int]]:
        return {"loop": {"nonfinite_in_row": self.nonfinite_in_row,
                         "skipped_total": self.skipped_total}}

    @staticmethod
    def from_extra(extra: dict | None) -> "LoopCounters":
        """The counters a checkpoint's extras hold (zeros for checkpoints written before)."""
        saved = (extra or {}).get("loop") or {}
        return LoopCounters(int(saved.get("nonfinite_in_row", 0)),
                            int(saved.get("skipped_total", 0)))


def summarize_interval(history: list[dict[str, torch.Tensor]], world: distributed.World,
                       buckets: int = 10, num_train_timesteps: int = 1000) -> dict[str, Any]:
    """Means over a log interval and over all ranks (one host sync, one all-reduce); the
    per-timestep-bucket loss when t is known; the mean of each 0-dim tensor a step reports in
    `metrics["scalars"]` (e.g. the GAN terms, gan.py) over the steps that report it."""
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
    names, scalar_sums = interval_scalars(history)
    if names:
        sums = torch.cat([sums, scalar_sums.to(sums.device)])
    totals = distributed.all_sum(world, sums).tolist()
    scalar_totals = totals[len(totals) - 2 * len(names):]
    totals = totals[:len(totals) - 2 * len(names)]
    out = {"loss": totals[0] / max(totals[1], 1.0),
           "grad_norm": torch.stack([m["grad_norm"] for m in history]).float().mean().item(),
           "skipped": int(sum(int(m["skipped"]) for m in history))}
    if len(totals) > 2:
        bucket_sums, counts = totals[2:2 + buckets], totals[2 + buckets:]
        out["loss_by_t"] = [round(v / c, 6) if c > 0 else None for v, c in zip(bucket_sums, counts)]
    for i, name in enumerate(names):  # sums over ranks of (sum over steps, number of steps)
        out[name] = scalar_totals[2 * i] / max(scalar_totals[2 * i + 1], 1.0)
    return out


def interval_scalars(history: list[dict[str, Any]]) -> tuple[list[str], torch.Tensor]:
    """The names of the scalars the interval's steps report, sorted, and a float32 tensor
    (2 * names,) of (sum over the steps reporting each, number of those steps)."""
    names = sorted({name for m in history for name in m.get("scalars", {})})
    parts = []
    for name in names:
        values = [m["scalars"][name].float().reshape(()) for m in history
                  if name in m.get("scalars", {})]
        parts += [torch.stack(values).sum(), torch.tensor(float(len(values)),
                                                          device=values[0].device)]
    return names, (torch.stack(parts) if parts else torch.zeros(0))


def poll(world: distributed.World, nonfinite_in_row: torch.Tensor,
         request: signals.StopRequest) -> tuple[int, int | None]:
    """The check (one host sync, one all-reduce under torchrun): the consecutive non-finite
    count and the stop signal, each the max over ranks, so every rank takes the same decision
    at the same step. Returns (count, signum or None)."""
    local = torch.stack([nonfinite_in_row.to(torch.int64).reshape(()),
                         torch.tensor(request.signum or 0, device=nonfinite_in_row.device)])
    count, signum = distributed.all_max(world, local).tolist()
    return int(count), (int(signum) or None)


CLOCK = time.perf_counter  # seconds; the interval rates' clock (tests replace it)


def interval_rate(steps: int, global_batch: int, elapsed_s: float, paused_s: float,
                  first_step_s: float | None = None) -> float:
    """samples/s of one logging interval's training steps: `paused_s` (grids, validation,
    checkpoints written in the interval) is left out, and so is the fit's first step when it
    is in the interval (`first_step_s`: the loader's start and, with train.compile, the compile),
    with its samples, unless it is the interval's only step."""
    if first_step_s is not None and steps > 1:
        steps, elapsed_s = steps - 1, elapsed_s - first_step_s
    return steps * global_batch / max(elapsed_s - paused_s, 1e-9)


def fit(state: TrainState, train_step: Callable, batches: Iterator[dict], settings: LoopSettings,
        run: Run, world: distributed.World, checkpoint_extra: Callable[[], dict],
        checkpoint_metadata: dict[str, str], lr_of: Callable[[int], float],
        on_sample: Callable[[TrainState], None] | None = None,
        on_validate: Callable[[TrainState], dict[str, Any]] | None = None,
        bad_samples: Callable[[], dict] = dict,
        counters: LoopCounters = LoopCounters()) -> TrainState:
    """Train `state` to `settings.total_steps`; returns the final state (checkpoint saved).

    Under torchrun every rank runs this loop in lockstep; rank 0 alone writes metrics,
    TensorBoard, grids and checkpoints, but every rank calls `checkpoint_extra` at a save (it
    may gather the data positions of all ranks, a collective). `counters` come from the
    checkpoint resumed from (`LoopCounters.from_extra`).

    Raises TrainingError (max_nonfinite non-finite steps in a row; non-finite weights at a
    save, nothing written), Interrupted (SIGINT / SIGTERM), OutOfMemory."""
    stage_dir = run.stage_dir(settings.stage)
    progress = Progress(settings.stage, state.step, settings.total_steps, settings.global_batch,
                        enabled=settings.show_progress and world.is_main)
    board = open_tensorboard(run.dir / "tensorboard") if world.is_main else None
    history: list[dict[str, torch.Tensor]] = []
    skipped_total = counters.skipped_total  # up to the last log
    in_row: Any = counters.nonfinite_in_row  # becomes a device tensor: updated without a sync
    next_check = state.step + settings.max_nonfinite - counters.nonfinite_in_row
    saved_step, t_log, step_log = -1, CLOCK(), state.step
    paused = 0.0  # seconds spent in grids, validation and saves since t_log: not training
    first_step_s: float | None = None  # to this fit's first finished step; logged once
    first_logged = False

    def save() -> Path | None:
        nonlocal saved_step
        refuse_nonfinite(state, settings.stage, stage_dir)  # every rank: same weights
        now = LoopCounters(int(in_row), skipped_total + sum(int(m["skipped"]) for m in history))
        extra = {**checkpoint_extra(), **now.to_extra()}  # on every rank: may be a collective
        saved_step = state.step
        if not world.is_main:
            return None
        return save_checkpoint(stage_dir, state, extra, checkpoint_metadata, settings.keep_last)

    with signals.deferred_stop(escalate=not world.distributed) as request:
        try:
            while state.step < settings.total_steps:
                batch = next(batches)
                state, metrics = train_step(state, batch)
                if first_step_s is None:
                    first_step_s = CLOCK() - t_log
                history.append(metrics)
                in_row = (in_row + 1) * metrics["skipped"]  # consecutive skipped steps, on device
                at_end = state.step == settings.total_steps
                count = None  # known only at a check
                signum = None if world.distributed else request.signum  # ranks agree at a check
                if state.step % settings.log_every == 0 or at_end or state.step >= next_check:
                    count, signum = poll(world, in_row, request)
                    next_check = state.step + settings.max_nonfinite - count
                diverged = count is not None and count >= settings.max_nonfinite
                if state.step % settings.log_every == 0 or at_end or diverged or signum:
                    summary = summarize_interval(history, world)
                    skipped_total += summary["skipped"]
                    rate = interval_rate(state.step - step_log, settings.global_batch,
                                         CLOCK() - t_log, paused,
                                         None if first_logged else first_step_s)
                    first = {} if first_logged else {"first_step_s": round(first_step_s, 3)}
                    first_logged = True
                    record = {"stage": settings.stage, "step": state.step,
                              "lr": lr_of(state.step - 1), "samples_per_s": round(rate, 2), **first,
                              "skipped_total": skipped_total, "nonfinite_in_row": int(in_row),
                              "bad_samples": merged_stats(distributed.gather_objects(
                                  world, bad_samples())), **summary, "time": time.time()}
                    if world.is_main:
                        run.log(record)
                        write_tensorboard(board, record)
                    progress.update(state.step, record["loss"], rate)
                    history, t_log, step_log, paused = [], CLOCK(), state.step, 0.0
                if diverged:
                    raise TrainingError(nonfinite_message(settings, count, state.step, stage_dir))
                hooks_start = CLOCK()
                if on_sample and settings.sample_every and (state.step % settings.sample_every == 0
                                                            or at_end) and world.is_main:
                    on_sample(state)
                if on_validate and settings.val_every and (state.step % settings.val_every == 0
                                                           or at_end) and world.is_main:
                    record = on_validate(state)  # the validation loss (val_hook.py)
                    run.log(record)
                    write_tensorboard(board, record)
                if (settings.save_every and state.step % settings.save_every == 0) or at_end:
                    save()
                paused += CLOCK() - hooks_start
                if signum:
                    path = latest_checkpoint(stage_dir) if saved_step == state.step else save()
                    raise Interrupted(path if world.is_main else None, state.step, signum)
        except KeyboardInterrupt as err:  # a second signal in one process: stop now, save nothing
            raise Interrupted(latest_checkpoint(stage_dir), state.step, signals.signum_of(err),
                              saved=False) from None
        except torch.OutOfMemoryError:
            # The weights may be half-updated: save nothing, keep the last good checkpoint.
            raise OutOfMemory(state.step, latest_checkpoint(stage_dir)) from None
        finally:
            progress.close()
            if board is not None:
                board.close()
    distributed.barrier(world)
    return state


def nonfinite_message(settings: LoopSettings, count: int, step: int, stage_dir: Path) -> str:
    return (f"{settings.stage}: the loss was non-finite for {count} steps in a row (up to step "
            f"{step}, --set train.max_nonfinite={settings.max_nonfinite}); no update was applied "
            f"on those steps. Lower {lr_option(settings.stage)}, raise --warmup or use "
            f"--precision fp32/bf16; "
            f"{last_good(stage_dir)}")


def lr_option(stage: str) -> str:
    """The t2i-train option that sets `stage`'s learning rate (--lr is the diffusion stage's,
    or the VAE's with --stage vae; --vae-lr always reaches stage 1)."""
    return "--vae-lr" if stage == "vae" else "--lr"


def last_good(stage_dir: Path) -> str:
    found = latest_checkpoint(stage_dir)
    return f"the last good checkpoint is {found}" if found else "no checkpoint was saved yet"


def refuse_nonfinite(state: TrainState, stage: str, stage_dir: Path) -> None:
    """Raises TrainingError, before anything is written, when a weight or EMA tensor holds
    NaN or inf (e.g. an infinite learning rate): a non-finite result is never saved."""
    bad = nonfinite_weights(state)
    if bad:
        raise TrainingError(
            f"{stage}: the weights became non-finite by step {state.step} ({len(bad)} tensor(s), "
            f"e.g. {bad[0]}); nothing was saved. Lower the learning rate ({lr_option(stage)}); "
            f"{last_good(stage_dir)}")
