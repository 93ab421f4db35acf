"""`t2i-eval RUN --suite shapes|vae|fid|agreement|val-loss`: score a trained run, write a JSON
report.

Every report holds the suite, n, the checkpoint, which weights (ema or raw; the vae suite:
file), the device, the sampler settings for the suites that sample (the vae suite: its seed),
then the suite's own numbers (see t2i/eval.py and the README). The fid suite, the long one,
shows a progress bar on stderr when that is a terminal.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from t2i import eval as metrics
from t2i.cli.common import (FiniteFloat, OneLineCommand, UserError, check_no_clash,
                            check_writable, output_dir, pick_device, progress_bar, set_threads,
                            user_errors)
from t2i.cli.sample import SEED, check_seeds, prompt_lines
from t2i.data import DataError, shapes
from t2i import validation
from t2i.sample import SAMPLERS, Pipeline, load_pipeline
from t2i.models.io import WeightsError
from t2i.models.vae_import import is_foreign

SUITES = ("shapes", "vae", "fid", "agreement", "val-loss")
# val-loss 0: the run's train.val_samples (its validation set, t2i/validation.py)
DEFAULT_N = {"shapes": 60, "vae": 256, "fid": 1000, "agreement": 8, "val-loss": 0}
SAMPLING_SUITES = ("shapes", "fid", "agreement")  # their reports carry the sampler settings
FAILURES_GRID = "shapes_failures.png"  # the shapes suite's failed images, when there are any


def output_names(suite: str) -> list[str]:
    """The files a suite may write into --out: its report, and for shapes the failures grid."""
    return [f"eval-{suite}.json"] + ([FAILURES_GRID] if suite == "shapes" else [])


def header(pipe: Pipeline, suite: str, ema: bool, sampler: str, steps: int, guidance: float,
           seed: int) -> dict[str, Any]:
    """What was scored, where, and how: the sampler settings for the suites that sample, the
    seed that drew the images for the vae suite, nothing more for val-loss (a fixed set)."""
    # the vae suite scores a VAE file (one set of weights: a run's is stage 1's EMA export)
    weights = "file" if suite == "vae" else "ema" if ema else "raw"
    out = {"suite": suite, "checkpoint": str(scored(pipe, suite)), "weights": weights,
           "device": str(pipe.device)}
    if suite in SAMPLING_SUITES:
        out["sampler"] = {"name": sampler, "steps": steps, "guidance": guidance, "seed": seed}
    elif suite == "vae":
        out["seed"] = seed
    return out


def scored(pipe: Pipeline | metrics.Autoencoder, suite: str) -> Path:
    """What the report's "checkpoint" names: the diffusion checkpoint read, or for the vae suite
    the VAE file scored (a full run's RUN/vae.safetensors, not its RUN/unet/ckpt-N)."""
    source = Path(pipe.source).resolve()
    if suite == "vae" and isinstance(pipe, Pipeline):  # source: RUN/unet/ckpt-N
        return source.parent.parent / "vae.safetensors"
    return source


def feature_extractors(inception: str | None, clip: str | None, clip_model: str,
                       device: str) -> tuple[metrics.Features | None, metrics.ClipScore | None]:
    """FID and CLIP extractors from local files; one may be missing (warned), not both. Raises
    UserError for a path given that is no file: a typo would otherwise cost a whole run."""
    for option, path in (("--inception-weights", inception), ("--clip-weights", clip)):
        if metrics.unusable(path):
            raise UserError(f"{option} {path!r} {metrics.unusable(path)}")
    built, missing = [], []
    for build, args in ((metrics.inception_features, (inception, device)),
                        (metrics.clip_scorer, (clip, clip_model, device))):
        try:
            built.append(build(*args))
        except metrics.MissingWeights as err:
            built.append(None)
            missing.append(str(err))
    if len(missing) == 2:
        raise UserError("nothing to measure: " + ". ".join(missing))
    for message in missing:
        click.echo(f"warning: {message}; that metric is reported as null", err=True)
    return built[0], built[1]


def vae_extractors(inception: str | None, lpips: str | None,
                   device: str) -> tuple[metrics.Features | None, Any]:
    """vae suite: (Inception features for reconstruction FID when --inception-weights is given,
    the LPIPS network when --lpips-weights is given); a path that is not such a file is an
    error; without one that metric is null, with a note."""
    from t2i.models.lpips import load_lpips
    try:
        features = metrics.inception_features(inception, device) if inception else None
        return features, load_lpips(lpips).to(device) if lpips else None
    except (metrics.MissingWeights, WeightsError) as err:
        raise UserError(str(err)) from err


def at_resolution(pipe: Pipeline | metrics.Autoencoder, resolution: int | None):
    """`pipe` reading its images at `resolution` (--resolution; None: the config's). Raises
    UserError when the VAE's downsampling factor does not divide it."""
    if resolution is None:
        return pipe
    factor = pipe.cfg.vae.downsample_factor
    if resolution % factor:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's "
                        f"downsampling factor {factor}")
    data = dataclasses.replace(pipe.cfg.data, resolution=resolution)
    return dataclasses.replace(pipe, cfg=dataclasses.replace(pipe.cfg, data=data))


def load_model(run: str, suite: str, ema: bool, device: str) -> Pipeline | metrics.Autoencoder:
    """The run's pipeline; for the vae suite, without a diffusion checkpoint, a VAE alone
    (load_vae_only): a run with only stage 1 done, a VAE file or a diffusers folder. Raises
    FileNotFoundError (for the vae suite: saying what it takes) and WeightsError."""
    try:
        return load_pipeline(run, ema=ema, device=device)
    except FileNotFoundError as err:
        if suite != "vae":
            raise
        from t2i.train.init_vae import is_vae_file
        if (Path(run) / "vae.safetensors").is_file() or is_vae_file(Path(run)):
            return load_vae_only(run, device)
        raise FileNotFoundError(f"{err}; the vae suite also takes a VAE alone: a run folder "
                                f"with vae.safetensors, a vae.safetensors file, a diffusers "
                                f"AutoencoderKL folder or an LDM file") from err


def load_vae_only(path: str, device: str) -> metrics.Autoencoder:
    """The VAE at `path` for the vae suite: a run folder's vae.safetensors or a t2i VAE file
    with the config it stores (data settings included); a diffusers folder or an LDM file
    with the config a converted file would carry (vae_import.carrier_config: its data at the
    `base` preset's resolution, rounded up to the VAE's multiple; pass --data). Raises
    WeightsError naming the file."""
    import torch

    from t2i.models.vae_import import carrier_config, import_vae
    if not is_foreign(path):
        return metrics.load_autoencoder(path, device)
    vae = import_vae(path)
    return metrics.Autoencoder(cfg=carrier_config(vae.cfg), vae=vae.to(device),
                               device=torch.device(device), source=Path(path))


def check_options(suite: str, n: int, prompts_file: str | None, ema: bool,
                  resolution: int | None, lpips: str | None, run: str,
                  source: str | None) -> None:
    """What the option types cannot say alone (ranges are in the types). --no-ema with the vae
    suite is refused: it scores a VAE file (RUN/vae.safetensors, written from stage 1's EMA, or
    the VAE file or folder given), which holds one set of weights (report "weights": "file");
    --resolution / --lpips-weights with another suite, and a foreign VAE `run` (diffusers
    folder, LDM file) without --data (`source` None), are refused too."""
    if n < {"fid": 2, "val-loss": 0}.get(suite, 1):
        raise UserError(f"--n {n} is too small for the {suite} suite")
    if suite == "vae" and not ema:
        raise UserError("--no-ema: the vae suite scores a VAE file (RUN/vae.safetensors, "
                        "stage 1's EMA export, or the VAE file or folder given), which holds "
                        "one set of weights; drop --no-ema")
    for given, name in ((resolution, "--resolution"), (lpips, "--lpips-weights")):
        if given is not None and suite != "vae":
            raise UserError(f"{name} is for the vae suite only")
    if suite == "vae" and source is None and is_foreign(Path(run)):
        raise UserError(f"--data: {run} is a diffusers folder or an LDM file, which names no "
                        f"images; pass --data (image shards to reconstruct)")
    if prompts_file and suite != "agreement":
        raise UserError("--prompts is for the agreement suite only (shapes uses its fixed "
                        "prompts, fid the captions of the real images)")


def images_drawn(suite: str, n: int, n_held_out: int) -> int:
    """How many seeds seed, seed + 1, ... a suite uses: one per generated image (shapes: seen
    and held-out prompts); the vae suite's seed only orders its data; val-loss has none."""
    return {"shapes": n + n_held_out, "fid": n, "agreement": n}.get(suite, 1)


def run_suite(pipe: Pipeline, suite: str, n: int, n_held_out: int, source: str,
              prompts: list[str], extractors: tuple, settings: dict[str, Any]
              ) -> tuple[dict[str, Any], list[metrics.Failure]]:
    """The suite's report (and the shapes suite's failed images)."""
    s = settings
    if suite == "shapes":
        return metrics.shapes_suite(pipe, n, n_held_out, **s)
    if suite == "vae":
        return metrics.vae_suite(pipe, source, n, s["batch_size"], s["seed"], *extractors), []
    if suite == "fid":
        with progress_bar(n) as bar:  # shown on a terminal only
            return metrics.fid_suite(pipe, source, n, *extractors, **s, on_batch=bar.update), []
    if suite == "val-loss":  # source "": the run's validation set; else all of --data
        return validation.val_loss_suite(pipe, source or None, n or None), []
    return metrics.sampler_agreement(pipe, prompts[:n], s["seed"], s["guidance"], s["steps"]), []


def write_outputs(out: Path, report: dict[str, Any], failures: list[metrics.Failure]) -> None:
    """eval-SUITE.json (and shapes_failures.png) in `out`, made if need be. Raises UserError
    naming --out when it cannot be written (the caller has printed the report already)."""
    try:
        write_files(out, report, failures)
    except OSError as err:
        raise UserError(f"--out {str(out)!r}: cannot write the report ({err.strerror or err}); "
                        f"its numbers are printed above") from err


def write_files(out: Path, report: dict[str, Any], failures: list[metrics.Failure]) -> None:
    """The report, and the shapes suite's failures grid; a shapes run without failures removes
    an earlier grid (one --overwrite let through), which would contradict its new report."""
    out.mkdir(parents=True, exist_ok=True)
    grid = metrics.failures_grid(failures)
    if grid is not None:
        grid.save(out / FAILURES_GRID)
        click.echo(f"failures grid: {out / FAILURES_GRID}", err=True)
    elif report["suite"] == "shapes":
        (out / FAILURES_GRID).unlink(missing_ok=True)
    path = out / output_names(report["suite"])[0]
    path.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(f"report: {path}", err=True)


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", type=click.Path())
@click.option("--suite", type=click.Choice(SUITES), required=True)
@click.option("--out", type=click.Path(file_okay=False), callback=output_dir, help="folder for eval-SUITE.json (+ shapes_failures.png)")
@click.option("--data", "source", help="vae/fid: data source [default: the run's data.source]; "
                                       "val-loss: held-out shards [default: the run's validation set]")
@click.option("--n", type=click.IntRange(min=1), help="images (shapes: seen prompts) [default: shapes 60, vae 256, "
                                    "fid 1000, agreement 8, val-loss: the run's "
                                    "train.val_samples]")
@click.option("--n-held-out", default=24, show_default=True, type=click.IntRange(min=0), help="shapes: held-out prompts")
@click.option("--prompts", "prompts_file", type=click.Path(), help="agreement: prompt file")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="pndm", show_default=True)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--guidance", type=FiniteFloat(min=0),
              help="[default: the run's train.sample_guidance]")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(SEED.low, SEED.high),
              help="image i uses seed + i (0 to 2^63 - 1)")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--ema/--no-ema", default=True, show_default=True, help="EMA or raw weights")
@click.option("--device", default=None, help="cpu | cuda | cuda:N [default: cuda if available]")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [default: OMP_NUM_THREADS, else the usable cores]")
@click.option("--resolution", type=click.IntRange(min=8),
              help="vae: image side in pixels [default: the run's data.resolution]")
@click.option("--lpips-weights", type=click.Path(),
              help="vae: LPIPS file (t2i.models.lpips format; never downloaded)")
@click.option("--inception-weights", type=click.Path(),
              help="fid, vae (reconstruction FID): torchvision inception_v3 .pth")
@click.option("--clip-weights", type=click.Path(), help="fid: open_clip weights file")
@click.option("--clip-model", default="ViT-B-32", show_default=True,
              help="fid: open_clip model of --clip-weights (OpenAI's: ViT-B-32-quickgelu)")
@click.option("--overwrite", is_flag=True,
              help="Replace eval-SUITE.json (and shapes_failures.png) already in --out "
                   "(else refused).")
@user_errors
def main(run: str, suite: str, out: str | None, source: str | None, n: int | None,
         n_held_out: int, prompts_file: str | None, sampler: str, steps: int, guidance: float | None,
         seed: int, batch_size: int, ema: bool, device: str | None, inception_weights: str | None,
         clip_weights: str | None, clip_model: str, threads: int | None,
         resolution: int | None, lpips_weights: str | None, overwrite: bool) -> None:
    """Score a trained run with one evaluation suite."""
    # read for the agreement suite only: check_options refuses --prompts with another
    prompts = prompt_lines(prompts_file) if prompts_file and suite == "agreement" else None
    n = n if n is not None else len(prompts) if prompts else DEFAULT_N[suite]
    check_options(suite, n, prompts_file, ema, resolution, lpips_weights, run, source)
    check_seeds(seed, images_drawn(suite, n, n_held_out))
    if out:
        check_writable(out)
        check_no_clash(out, output_names(suite), overwrite)
    device = str(pick_device(device))
    set_threads(threads)
    extractors = (feature_extractors(inception_weights, clip_weights, clip_model, device)
                  if suite == "fid" else vae_extractors(inception_weights, lpips_weights, device)
                  if suite == "vae" else (None, None))
    settings = {"sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed,
                "batch_size": batch_size}
    try:
        pipe = load_model(run, suite, ema, device)
        pipe = at_resolution(pipe, resolution) if suite == "vae" else pipe
        guidance = pipe.guidance(guidance)
        settings["guidance"] = guidance
        own = "" if suite == "val-loss" else pipe.cfg.data.source  # val-loss: its validation set
        result, failures = run_suite(pipe, suite, n, n_held_out, source or own,
                                     prompts or shapes.eval_prompts(True, n), extractors, settings)
    except (ValueError, DataError, WeightsError) as err:
        raise UserError(str(err)) from err
    report = {**header(pipe, suite, ema, sampler, steps, guidance, seed), **result}
    click.echo(json.dumps(report, indent=2))
    if out:
        write_outputs(Path(out), report, failures)


if __name__ == "__main__":
    main()
