"""Which run folder `t2i-train` uses and what a resume may change: --resume auto | RUN |
RUN/<stage>/ckpt-N resolved to a folder, the options a resume does not read, the changes it
refuses (what a stage trains, fewer steps than done), local paths made absolute, and the lock
held on the folder while training."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import click

from t2i.cli.common import UserError
from t2i.config import Config, architecture_changes, listed
from t2i.data.sources import absolute_source
from t2i.models.checkpoints import checkpoint_step, latest_checkpoint, resolve_checkpoint
from t2i.models.io import WeightsError
from t2i.train.run import LOCK, STAGES, Run, locked, new_run_dir, newest_run
from t2i.train.state import lr_at


def resolve_run(resume: str | None, out: str | None, cfg: Config, runs_root: Path
                ) -> tuple[Run, bool, Path | None]:
    """Which run folder to use, whether to resume in it, and the checkpoint folder named with
    `--resume RUN/<stage>/ckpt-N` (None: each stage's newest intact checkpoint). Raises
    UserError for a --resume path that is no run or checkpoint, with an --out other than its
    run's folder (the run continues in its own), and for a new run in a folder that already
    holds one."""
    if resume is None:
        run = Run(Path(out) if out else new_run_dir(cfg, runs_root))
        if run.holds_run():
            raise UserError(f"{str(run.dir)!r} already holds a run: continue it with --resume "
                            f"auto --out {run.dir}, or pass another --out")
        return run, False, None
    if resume == "auto":
        found = Path(out) if out else newest_run(runs_root)
        if found is None or not Run(found).holds_run():
            return Run(found or new_run_dir(cfg, runs_root)), False, None
        return Run(found), True, None
    if not Path(resume).exists():
        raise UserError(f"--resume {resume}: no such run folder or checkpoint")
    try:
        run_dir, named = resolve_checkpoint(Path(resume))
    except WeightsError as err:
        raise UserError(f"--resume {resume}: {err}") from err
    if not Run(run_dir).holds_run():
        raise UserError(f"--resume {resume}: not a t2i run folder (no config.json or checkpoints)")
    if out and Path(out).resolve() != Path(run_dir).resolve():
        raise UserError(f"--out {out} with --resume {resume}: the run continues in its own "
                        f"folder {run_dir}; drop --out")
    return Run(run_dir), True, named


def start_options(config_file: str | None, preset: str | None) -> list[str]:
    """The given options that only a new run reads (--preset: None when not given): a resume
    uses the run's own RUN/config.json with the explicit options and --set on top."""
    return ([f"--config {config_file}"] if config_file else []) + (
        [f"--preset {preset}"] if preset else [])


def refuse_start_options(resume: str | None, given: list[str]) -> None:
    """Raises UserError for a start-only option (`start_options`) with `--resume RUN|CKPT`,
    which never starts a run, so the option would be dropped silently. (`--resume auto` may
    start one: `note_start_options` says when it resumes instead.)"""
    if resume not in (None, "auto") and given:
        raise UserError(f"{given[0]} with --resume {resume}: a resume uses the run's own "
                        f"RUN/config.json; give changes with --set KEY=VALUE or options")


# (section, key, stage): keys that decide which parameters the stage's optimizer holds
TRAINED_SET = (("vae", "freeze_encoder", "vae"), ("text", "frozen", "unet"))


def refuse_trained_set_change(saved: Config, cfg: Config, run: Run) -> None:
    """Raises UserError when a resume would change which parameters a stage that has a
    checkpoint trains (TRAINED_SET): its optimizer and EMA hold the saved set's state alone;
    or the architecture of weights the run holds (refuse_architecture_change). (Before the
    stage's first checkpoint the change is free.)"""
    refuse_architecture_change(saved, cfg, run)
    for section, name, stage in TRAINED_SET:
        was, now = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if was != now and latest_checkpoint(run.stage_dir(stage)) is not None:
            raise UserError(f"{section}.{name}={str(now).lower()} with --resume {run.dir}: the "
                            f"run trained with {section}.{name}={str(was).lower()} and its "
                            f"checkpoints hold that optimizer; start a new run (--init-from) "
                            f"to change what is trained")


def refuse_architecture_change(saved: Config, cfg: Config, run: Run) -> None:
    """Raises UserError when a resume's --set changes an architecture field (config
    architecture.py) of weights the run holds: the VAE once stage 1 has a checkpoint or
    vae.safetensors exists (stage 2 trains on that file), the UNet and text tower once stage 2
    has a checkpoint. The weights would load (same shapes) and compute something else."""
    held = (("vae",) if latest_checkpoint(run.stage_dir("vae")) or run.vae_weights.is_file()
            else ()) + (("unet", "text") if latest_checkpoint(run.stage_dir("unet")) else ())
    changes = architecture_changes(saved, cfg, held)
    if changes:
        raise UserError(f"--resume {run.dir}: the run's weights were trained with "
                        f"{listed(changes)}; a resume keeps the architecture: drop those "
                        f"--set, or start a new run")


def refuse_finished_stage_1(cfg: Config, run: Run, named: Path | None) -> None:
    """Raises UserError for `--resume RUN/vae/ckpt-N` in a run of both stages whose stage 1
    has finished (RUN/vae.safetensors): the run would skip stage 1 and go on with stage 2, the
    checkpoint named unused; redoing stage 1 would leave the UNet trained on another VAE."""
    if (named is not None and named.parent.name == "vae" and cfg.train.stage == "all"
            and run.vae_weights.is_file()):
        raise UserError(f"--resume {named}: {run.dir} finished stage 1 (vae.safetensors, which "
                        f"its stage 2 trains on), so a stage-1 checkpoint is not resumed in it; "
                        f"to train that VAE further start a new run with --stage vae "
                        f"--init-from {named}")


def resumed_checkpoint(run: Run, stage: str, named: Path | None) -> Path | None:
    """The checkpoint `stage` resumes from: the one named with --resume when it is that
    stage's, else the stage's newest (None: the stage starts)."""
    if named is not None and named.parent.name == stage:
        return named
    return latest_checkpoint(run.stage_dir(stage))


def refuse_steps_behind(cfg: Config, run: Run, named: Path | None) -> None:
    """Raises UserError when a resume gives a stage fewer steps than the checkpoint it resumes
    from has done: it would train nothing and rewrite config.json with the shorter length."""
    for stage in STAGES:
        ckpt = resumed_checkpoint(run, stage, named)
        steps, done = getattr(cfg.train, f"{stage}_steps"), checkpoint_step(ckpt) if ckpt else 0
        if steps >= done:
            continue
        option = "--steps" if stage == "unet" else "--stage vae --steps"
        raise UserError(f"train.{stage}_steps={steps} with --resume {run.dir}: its {stage} stage "
                        f"is at step {done} already; give {option} {done} or more, or start a "
                        f"new run from it with --init-from")


def schedule_notes(saved: Config, cfg: Config, run: Run, named: Path | None) -> list[str]:
    """A note per stage whose resume changes the learning rate it continues at: the cosine
    decay runs over `train.<stage>_steps`, so more (or fewer) steps re-spread it and the
    learning rate jumps at the checkpoint's step (so does a changed rate or warm-up). Printed
    once the resume has passed every check (launch's `notes`), never before a refusal."""
    notes = []
    for stage in STAGES:
        ckpt = resumed_checkpoint(run, stage, named)
        step = checkpoint_step(ckpt) if ckpt else 0
        was, now = (stage_lr(c, stage, step) for c in (saved, cfg))
        if ckpt is not None and step < getattr(cfg.train, f"{stage}_steps") and \
                not math.isclose(was, now, rel_tol=1e-6):
            notes.append(f"the {stage} stage continues at step {step} with learning rate "
                         f"{now:.3g}, not the {was:.3g} its saved settings give there (the "
                         f"schedule is over train.{stage}_steps="
                         f"{getattr(cfg.train, f'{stage}_steps')}, was "
                         f"{getattr(saved.train, f'{stage}_steps')}; README, Resume)")
    return notes


def stage_lr(cfg: Config, stage: str, step: int) -> float:
    """The learning rate `cfg` gives `stage` at `step` (state.lr_at)."""
    return lr_at(step, getattr(cfg.train, f"{stage}_lr"), cfg.train.warmup_steps,
                 getattr(cfg.train, f"{stage}_steps"), cfg.train.lr_schedule)


def note(message: str) -> None:
    """A `note:` line on stderr, printed by one process only (torchrun's RANK 0, or the only
    one): the start-up checks run on every rank before the process group exists."""
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"note: {message}", err=True)


def note_start_options(given: list[str], run: Run) -> None:
    """One `note:` line per start-only option that `--resume auto` does not read because it
    resumes `run` (the same command line starts a new run when there is none)."""
    for option in given:
        note(f"{option} not read: resuming {run.dir}, which uses its own "
             f"{run.dir / 'config.json'}; give changes with --set KEY=VALUE or options")


# config keys holding local paths: data sources (lists, globs, URLs) and single files
SOURCE_KEYS = (("data", "source"), ("data", "val_source"))
FILE_KEYS = (("text", "weights"), ("vae", "lpips_weights"))


def with_absolute_paths(cfg: Config, saved: Config | None = None) -> Config:
    """`cfg` with the local paths it was given now made absolute (`absolute_source` for data
    sources), so config.json names the same files from any working directory: all of a new
    run's, and on a resume those that differ from the `saved` config (a run written before
    paths were made absolute keeps its relative ones, which its saved data position names)."""
    for section, key in SOURCE_KEYS + FILE_KEYS:
        value = getattr(getattr(cfg, section), key)
        if not value or (saved is not None and value == getattr(getattr(saved, section), key)):
            continue
        value = (absolute_source(value) if (section, key) in SOURCE_KEYS
                 else os.path.abspath(os.path.expanduser(value)))
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                       **{key: value})})
    return cfg


@contextlib.contextmanager
def hold_run_folder(run: Run, resuming: bool = False) -> Iterator[None]:
    """Lock the run folder for this process's lifetime (rank 0 only under torchrun: the other
    ranks use rank 0's folder). A folder this start created and left without a run (it failed
    before config.json) is removed, so `--resume auto` never picks it. Raises RunFolderError
    when another trainer holds the folder (a resume can only wait: its run is in that folder).
    (A failed start that got further is removed by `launch`, see its `new_folder`.)"""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    created = not run.dir.exists()
    with locked(run.dir, "wait for it to end" if resuming else
                "wait for it to end or pass another --out"):
        try:
            yield
        finally:
            if created and run.dir.is_dir() and {p.name for p in run.dir.iterdir()} <= {LOCK}:
                shutil.rmtree(run.dir, ignore_errors=True)
