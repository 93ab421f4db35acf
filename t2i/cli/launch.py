"""Start a run for `t2i-train`: join torchrun's world, train (the stages write config.json once
their setup succeeded), and map failures to one line and an exit status. The command-line side
of training: t2i/train/ raises, this module echoes (click) and chooses the status.

Exit status: 0 done; 2 bad user input (paths, presets, options, a VAE from another config,
offline machine asked for the Hub or a pretrained tag, a damaged weights or checkpoint file, a
checkpoint that cannot be written (disk full: the previous one stays intact), out of memory: the
batch size is the user's choice, so it is reported with the sizes and a hint, and nothing
partial is saved; too many bad samples, a DataError: the data needs fixing); 1 the run itself
failed (the loss stayed non-finite, or the weights did: nothing non-finite is written); 130
interrupted by Ctrl-C (SIGINT), 143 by SIGTERM (SLURM, Kubernetes): during training a
checkpoint of the step reached is saved first (see t2i/train/signals.py and loop.py), during
start-up, setup or the VAE export nothing new is saved. A first start that fails or is
interrupted before it saved anything (no checkpoint, no trained VAE) removes the run folder it
created, so the same command can simply run again.
"""

from __future__ import annotations

import os
import shutil
from typing import Sequence
from pathlib import Path
from shlex import quote

import click
import torch

from t2i.config import Config, ConfigError
from t2i.data import DataError
from t2i.models.checkpoints import holds_checkpoints
from t2i.models.io import WeightsError
from t2i.train import distributed, signals
from t2i.train.loop import Interrupted, OutOfMemory, TrainingError
from t2i.train.run import STAGES, Run
from t2i.train.stages import Env, train


def echo(world: distributed.World, message: str, err: bool = False) -> None:
    if world.is_main:
        click.echo(message, err=err)


def echo_any_rank(world: distributed.World, message: str) -> None:
    """An error that may hit one rank only (its data, its GPU's memory): every rank prints it,
    tagged, so a failed rank is never silent under torchrun."""
    click.echo(message if world.is_main else f"[rank {world.rank}] {message}", err=True)


@signals.immediate_stop()  # SIGTERM raises like Ctrl-C until the training loop defers both
def launch(cfg: Config, run: Run, resuming: bool, device: torch.device, vae_path: str | None,
           log_every: int = 10, show_progress: bool = True,
           resume_from: Path | None = None, new_folder: bool = False,
           notes: Sequence[str] = ()) -> int:
    """Train `cfg` in `run` (resuming it, from the checkpoint folder `resume_from` when one was
    named) and return the exit status. config.json is written by the stages once their setup
    succeeded, so a failed start or resume leaves the run folder as it was. `new_folder`: this
    start created the run folder; a failure or interrupt before anything was saved (no
    checkpoint, no trained VAE) removes it, so the same command can run again and `--resume
    auto` never picks it. `notes` are printed as `note:` lines once the first stage has
    started (its checkpoint and data position accepted), after the `run:`/`resuming:` line."""
    ok = False
    try:
        status = _launch(cfg, run, resuming, device, vae_path, log_every, show_progress,
                         resume_from, discard_if_unsaved=new_folder, notes=notes)
        ok = status == 0
        return status
    finally:
        if not ok and new_folder and os.environ.get("RANK", "0") == "0":  # rank 0 owns it
            discard_failed_start(run, vae_path)


def _launch(cfg: Config, run: Run, resuming: bool, device: torch.device, vae_path: str | None,
            log_every: int, show_progress: bool, resume_from: Path | None,
            discard_if_unsaved: bool, notes: Sequence[str] = ()) -> int:
    world = distributed.init_world(device.type)
    device = distributed.device_for(world, str(device))
    # Rank 0's choice of run folder wins (new_run_dir's timestamp could differ between ranks).
    run_dir, resuming = distributed.broadcast_object(world, (str(run.dir), resuming))
    run = Run(Path(run_dir))
    named = f" from {resume_from.name}" if resuming and resume_from else ""
    started: list[str] = []

    def announce() -> None:  # once the first stage has started (config.json written): a failed
        if not started:  # start prints no `run:` line, only its Error
            started.append(str(run.dir))
            echo(world, f"{'resuming' if resuming else 'run'}: {run.dir}{named}  (preset "
                        f"{cfg.preset}, data {cfg.data.source}, device {device}, "
                        f"{world.world_size} process(es))")
            for message in notes:
                echo(world, f"note: {message}", err=True)

    env = Env(device=device, world=world, resume=resuming, show_progress=show_progress,
              log_every=log_every, resume_from=resume_from, on_start=announce)
    try:
        train(cfg, run, env, vae_path)
    except Interrupted as stop:
        echo(world, interrupted_message(stop, run, discard_if_unsaved, vae_path), err=True)
        return signals.exit_status(stop.signum)
    except KeyboardInterrupt as err:  # outside the training steps: nothing new to save
        signum = signals.signum_of(err)
        echo(world, f"\ninterrupted by {signals.describe(signum)} outside the training steps "
                    f"(start-up, setup or export): nothing new saved"
                    f"{resume_hint(run, discard_if_unsaved, vae_path)}", err=True)
        return signals.exit_status(signum)
    except (ConfigError, WeightsError, FileNotFoundError) as err:
        echo(world, f"Error: {err}", err=True)  # the same on every rank: printed once
        return 2
    except DataError as err:
        echo_any_rank(world, f"Error: {err}")
        return 2
    except (OutOfMemory, torch.OutOfMemoryError) as err:
        echo_any_rank(world, out_of_memory_message(cfg, device, world, err))
        return 2
    except TrainingError as err:
        echo_any_rank(world, f"Error: {err}")
        return 1
    except RuntimeError as err:  # a collective failed: a peer process stopped first
        if not (world.distributed and lost_peers(err)):
            raise
        echo_any_rank(world, f"Error: this process lost the other ranks ({type(err).__name__}):"
                             f" one stopped first, its Error line above says why")
        return 2
    finally:
        distributed.shutdown(world)
    echo(world, f"done: {run.dir}\n{next_step_hint(cfg, run)}")
    return 0


def lost_peers(err: RuntimeError) -> bool:
    """A collective that failed because another rank has gone (it stopped on its own error,
    e.g. its data source passed data.max_bad_fraction): gloo's closed connection, NCCL's
    errors, torch's DistBackendError."""
    backend_error = getattr(torch.distributed, "DistBackendError", ())
    text = str(err)
    return isinstance(err, backend_error) or any(
        mark in text for mark in ("Connection closed by peer", "Connection reset by peer",
                                  "Broken pipe", "NCCL"))


def next_step_hint(cfg: Config, run: Run) -> str:
    """What to run after a successful run: sample from a run with a diffusion stage; after a
    VAE-only run (no diffusion checkpoint to sample from), train stage 2 on its VAE with the
    run's own config (a new run folder under runs/)."""
    if cfg.train.stage == "vae":
        hint = (f"train the diffusion stage on this VAE with:\n  t2i-train --config "
                f"{quote(str(run.config_path))} --stage unet --vae {quote(str(run.vae_weights))}")
        if cfg.data.source == "shapes":
            return hint
        return (f"{hint}\nor, as the text-to-image-2M recipe does (README), encode the images "
                f"once and train stage 2 from the latents:\n  t2i-data encode "
                f"{quote(cfg.data.source)} LATENTS --vae {quote(str(run.dir))} --resolution "
                f"{cfg.data.resolution}")
    return (f"sample from it with:\n  t2i-sample {quote(str(run.dir))} "
            f"{quote(example_prompt(cfg))} --out {quote(str(Path(run.dir) / 'generated'))}")


def nothing_saved(run: Run, vae_path: str | None) -> bool:
    """No checkpoint (complete or not) and no VAE trained here (a copy of --vae is no work)."""
    trained_vae = run.vae_weights.is_file() and vae_path is None
    return not trained_vae and not any(holds_checkpoints(run.stage_dir(s)) for s in STAGES)


def discard_failed_start(run: Run, vae_path: str | None) -> bool:
    """Remove the run folder of a failed first start that saved nothing (the caller created
    the folder); True when removed."""
    if not run.dir.is_dir() or not nothing_saved(run, vae_path):
        return False
    shutil.rmtree(run.dir, ignore_errors=True)
    return True


def interrupted_message(stop: Interrupted, run: Run, new_folder: bool = False,
                        vae_path: str | None = None) -> str:
    """One line: the signal, the step, the checkpoint saved (or kept), how to continue."""
    if stop.saved:
        where = f"checkpoint saved in {stop.path}"
    elif stop.path:
        where = f"stopped at once by a second signal: nothing saved, the last checkpoint " \
                f"{stop.path} is intact"
    else:
        where = "stopped at once by a second signal: nothing saved, no checkpoint yet"
    return (f"\ninterrupted by {signals.describe(stop.signum)} at step {stop.step}: {where}"
            f"{resume_hint(run, new_folder, vae_path)}")


def resume_hint(run: Run, new_folder: bool = False, vae_path: str | None = None) -> str:
    """How to continue: `--resume RUN` when the folder holds a resumable run; nothing when it
    holds none, or when it is this start's new folder with nothing saved (it is removed)."""
    if new_folder and nothing_saved(run, vae_path):
        return f"; removed the new run folder {run.dir} (nothing was saved in it)"
    if not run.config_path.is_file():
        return ""
    return f"; continue with {resume_command(run)}"


def resume_command(run: Run) -> str:
    """`t2i-train --resume RUN`, or under torchrun the launch it needs (a checkpoint resumes
    with the process count that saved it): WORLD_SIZE / LOCAL_WORLD_SIZE from torchrun."""
    resume = f"--resume {quote(str(run.dir))}"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes <= 1:
        return f"t2i-train {resume}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", processes))
    nodes = f" on each of its {processes // per_node} nodes" if per_node < processes else ""
    return (f"the same torchrun launch{nodes}: torchrun --nproc_per_node {per_node} -m "
            f"t2i.cli.train {resume}")


def out_of_memory_message(cfg: Config, device: torch.device, world: distributed.World,
                          err: BaseException) -> str:
    """One line: where it ran out, the batch sizes, what to change, and the intact checkpoint."""
    b, k = cfg.train.batch_size, cfg.train.grad_accum
    micro = b // max(1, world.world_size * k)
    where = f" at step {err.step}" if isinstance(err, OutOfMemory) else ""
    kept = (f"; the last checkpoint {err.last_checkpoint} is intact"
            if isinstance(err, OutOfMemory) and err.last_checkpoint else "")
    return (f"Error: out of memory on {device}{where} with --batch-size {b} (micro-batch {micro} "
            f"per process with --grad-accum {k}); lower --batch-size, or raise --grad-accum to "
            f"keep the batch with less memory, or use --precision bf16{kept}")


def example_prompt(cfg: Config) -> str:
    return "a red circle on the left" if cfg.data.source == "shapes" else "a photo of a cat"
