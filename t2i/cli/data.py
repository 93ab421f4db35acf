"""`t2i-data`: pack a folder of captioned images into shards, export the shapes set as shards,
inspect any source (count, sizes, modes, prompt lengths, bad samples, contact sheet), encode
image shards once into latent shards for stage 2, convert a foreign VAE."""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Callable

import click

from t2i.cli.common import (OneLineGroup, UserError, check_writable, output_dir, pick_device,
                            progress_bar, set_threads, user_errors)
from t2i.data.errors import DataError
from t2i.models.io import WeightsError

ENCODE_WAIT = datetime.timedelta(days=7)  # how long encode ranks wait for each other


def data_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """DataError (bad path, empty folder, offline Hub) -> one line, exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DataError as err:
            raise UserError(str(err)) from err

    return user_errors(wrapper)


def sheet_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """click callback of --sheet: an image format PIL writes (by the extension) in a folder
    that can be made, checked before any work (t2i.data.inspect.check_sheet_path)."""
    if value is None:
        return value
    from t2i.data.inspect import check_sheet_path

    try:
        check_sheet_path(value)
    except DataError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    output_dir(ctx, param, os.path.dirname(value) or ".")
    check_writable(os.path.dirname(value) or ".", "--sheet's folder")
    return value


def safetensors_file(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """click callback of convert-vae's OUT: a .safetensors file (other t2i tools read any other
    name as a pickle) in a folder that can be made, checked before the conversion."""
    if not value.endswith(".safetensors"):
        raise click.BadParameter(f"{value!r} must end in .safetensors (t2i reads VAE files "
                                 f"by that name)", ctx, param)
    output_dir(ctx, param, os.path.dirname(value) or ".")
    return value


def token_counter() -> Callable[[str], int]:
    """Untruncated CLIP BPE length including start and end tokens (the models' tokenizer is
    open_clip's; counting needs the raw encoder, which open_clip exposes)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text)) + 2


def bar_shown(progress: bool) -> bool | None:
    """--progress: a bar when stderr is a terminal (None: tqdm decides), never in a redirected
    log; --no-progress: none."""
    return None if progress else False


def iterable_bar(total: int | None, unit: str, enabled: bool):
    return lambda iterable: progress_bar(total, unit, bar_shown(enabled), iterable=iterable)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Data tools for t2i: pack, shapes, inspect, encode, convert-vae."""


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False), callback=output_dir)
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard.")
@click.option("--keep-format", is_flag=True,
              help="Store non-JPEG images as they are instead of converting to JPEG (q95).")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards of an earlier run in OUT (OUT must hold nothing else).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr when it is a terminal.")
@data_errors
def pack(src: str, out: str, shard_size: int, keep_format: bool, overwrite: bool,
         progress: bool) -> None:
    """Pack SRC (images with same-name .txt captions, or metadata.jsonl with file_name and
    text) into OUT/data_000000.tar ... in the text-to-image-2M layout. OUT must be new or
    empty (or see --overwrite); it appears only once every shard is written."""
    from t2i.data.pack import pack_folder

    report = pack_folder(src, out, shard_size, keep_format, overwrite,
                         progress=iterable_bar(None, "img", progress))
    click.echo(report.summary())


@main.command()
@click.argument("out", type=click.Path(file_okay=False), callback=output_dir)
@click.option("--count", required=True, type=click.IntRange(min=1), help="Samples to write.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--resolution", default=64, show_default=True, type=click.IntRange(min=16))
@click.option("--shard-size", default=1000, show_default=True, type=click.IntRange(min=1))
@click.option("--overwrite", is_flag=True,
              help="Replace the shards of an earlier run in OUT (OUT must hold nothing else).")
@data_errors
def shapes(out: str, count: int, seed: int, resolution: int, shard_size: int,
           overwrite: bool) -> None:
    """Export the built-in shapes set as shards (JSON also holds the attributes) into OUT,
    which must be new or empty (or see --overwrite)."""
    from t2i.data.pack import export_shapes

    paths = export_shapes(out, count, seed=seed, resolution=resolution, shard_size=shard_size,
                          overwrite=overwrite)
    click.echo(f"wrote {count} shapes samples ({resolution}x{resolution}) into {len(paths)} "
               f"shard(s) under {out}")


@main.command()
@click.argument("source")
@click.option("--subset", default="512", show_default=True, help="Hub subset (512 or 1024).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Stop after this many samples (the count becomes an estimate).")
@click.option("--resolution", default=None, type=click.IntRange(min=8),
              help="Training resolution R: an image whose shorter side is under R/4 counts as "
                   "too_small, as training at R skips it [default: no too_small check].")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None, callback=sheet_file,
              help="Write a contact sheet image here (.png, .jpg, ...: the extension says "
                   "the format).")
@click.option("--sheet-count", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr when it is a terminal.")
@data_errors
def inspect(source: str, subset: str, limit: int | None, resolution: int | None,
            sheet: str | None, sheet_count: int, as_json: bool, progress: bool) -> None:
    """Report on SOURCE, image shards: a folder/glob of .tar shards, hf://owner/name, or URLs.
    Input that holds no image shard (latent shards, a file that is no tar) is refused."""
    from t2i.data.inspect import format_report, image_shards, inspect_source, write_sheet

    shards = image_shards(source, subset)  # a bad source fails before the tokenizer loads
    report = inspect_source(source, subset, limit=limit, resolution=resolution,
                            sheet_count=sheet_count if sheet else 0,
                            count_tokens=token_counter(),
                            progress=iterable_bar(limit, "sample", progress), shards=shards)
    info = report.as_dict() | ({"sheet": sheet} if sheet else {})
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))
    if sheet:  # after the report: a failed write loses nothing else
        write_sheet(report, sheet)
        if not as_json:
            click.echo(f"contact sheet {sheet} ({len(report.sheet)} samples)")


@main.command()
@click.argument("src")
@click.argument("out", type=click.Path(file_okay=False), callback=output_dir)
@click.option("--vae", "vae_path", required=True, type=click.Path(),
              help="A run folder or its vae.safetensors: the VAE that encodes.")
@click.option("--resolution", "resolutions", multiple=True, type=click.IntRange(min=8),
              default=(256,), show_default=True,
              help="Training resolution R (repeatable: one pass reads each sample once for all).")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16",
              show_default=True, help="Storage dtype of the moments.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="Images per VAE encoder call.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N [default: cuda if available]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="Encoder autocast (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="DataLoader workers reading and decoding shards (0: in this process).")
@click.option("--crop", type=click.Choice(["center"]), default="center", show_default=True,
              help="Only center: a random crop or flip is drawn anew at every visit in "
                   "training and cannot be frozen into a file.")
@click.option("--subset", default="512", show_default=True, help="Hub subset (512 or 1024).")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [default: OMP_NUM_THREADS, else the usable cores]")
@click.option("--max-bad-fraction", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              help="Stop once this share of the samples read is bad (training's "
                   "data.max_bad_fraction: what a run on the images would refuse).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="A progress bar on stderr when it is a terminal.")
@data_errors
def encode(src: str, out: str, vae_path: str, resolutions: tuple[int, ...], dtype: str,
           batch_size: int, device: str | None, precision: str, workers: int, crop: str,
           subset: str, threads: int | None, max_bad_fraction: float, progress: bool) -> None:
    """Encode the image shards of SRC (any --data source) once with a trained VAE into latent
    shards in OUT: one tar per input shard (same name) holding KEY.json and, per resolution,
    KEY.moments{R}.safetensors (posterior mean and logvar), plus OUT/manifest.json. Running the
    same command again resumes (finished shards are kept); an OUT made with another VAE or other
    settings is refused. Under torchrun each rank encodes its own shards."""
    from t2i.train import distributed

    target = pick_device(device)
    # gloo whatever the device: the ranks only exchange small objects, and wait for each other
    # for as long as the slowest takes (shards of 7-11 GB: hours; a failed rank stops the
    # others through OUT/.encode/stop, not through a collective's timeout)
    world = distributed.init_world(target.type, backend="gloo", timeout=ENCODE_WAIT)
    try:
        target = distributed.device_for(world, str(target))
        set_threads(threads, workers)
        encode_on_ranks(world, src, out, vae_path, resolutions, dtype, batch_size, target,
                        precision, workers, crop, subset, progress, max_bad_fraction)
    finally:
        distributed.shutdown(world)


def encode_on_ranks(world, src: str, out: str, vae_path: str, resolutions: tuple[int, ...],
                    dtype: str, batch_size: int, device, precision: str, workers: int, crop: str,
                    subset: str, progress: bool, max_bad_fraction: float = 0.05) -> None:
    """Every rank plans and encodes its own shards; rank 0 checks OUT before any rank starts and
    writes the manifest once all ranks finished (see `agree`)."""
    import t2i
    from t2i.data import encode as enc
    from t2i.models.vae_files import open_vae, vae_sha256
    from t2i.sample import PRECISIONS, autocast_dtype
    from t2i.train import distributed

    precision_name = {cast: name for name, cast in PRECISIONS.items()}  # None -> "fp32"

    planned: list = []  # the plan, once made: where a failed rank leaves its error

    def agree(call: Callable[[], Any], main_only: bool = False) -> Any:
        """call() on every rank (on rank 0 only with main_only) and its result; the collective
        after it is the barrier. An error on any rank stops every rank: it is left in
        OUT/.encode/stop, which the others read after each chunk (enc.PeerStopped); rank 0
        prints the first one, the others exit with status 2 silently."""
        result, error, failure = None, None, None
        try:
            if world.is_main or not main_only:
                result = call()
        except enc.PeerStopped:
            pass  # another rank's error: it reports it
        except (DataError, WeightsError) as err:
            error = str(err)
        except Exception as err:  # a bug: the other ranks stop, this one shows its traceback
            error, failure = f"rank {world.rank} failed: {type(err).__name__}: {err}", err
        if error is not None and planned and world.distributed:
            enc.request_stop(planned[0], error)
        errors = [e for e in distributed.gather_objects(world, error) if e]
        if failure is not None:
            raise failure
        if errors:
            if world.is_main:
                raise DataError(errors[0])
            raise click.exceptions.Exit(2)
        return result

    def make_plan():
        vae = open_vae(vae_path)
        plan = enc.plan_encode(
            src, out, subset=subset, resolutions=resolutions, dtype=dtype, crop=crop,
            batch_size=batch_size, precision=precision_name[autocast_dtype(device, precision)],
            vae_sha256=vae_sha256(vae_path),  # what stage 2 checks the manifest against
            latent_scale=float(vae.latent_scale), z_channels=vae.cfg.z_channels,
            factor=vae.downsample_factor, t2i_version=t2i.__version__,
            max_bad_fraction=max_bad_fraction)
        return plan, vae.to(device)

    plan, vae = agree(make_plan)
    planned.append(plan)
    agree(lambda: enc.prepare_output(plan), main_only=True)
    bar = encode_progress(progress and world.is_main)
    report = agree(lambda: enc.encode_shards(
        plan, vae, device=device, autocast_dtype=autocast_dtype(device, precision),
        rank=world.rank, world_size=world.world_size, workers=workers, progress=bar,
        stopped=(lambda: enc.stop_requested(plan)) if world.distributed else None))
    bar(0, None, close=True)
    reports = distributed.gather_objects(world, report)
    manifest = agree(lambda: enc.finish_output(plan), main_only=True)
    if world.is_main:
        split = ("; shards encoded now per rank: " + "+".join(str(r.shards) for r in reports)
                 if world.distributed else "")
        click.echo(enc.summary(manifest, sum(r.bytes for r in reports),
                               sum(r.samples for r in reports)) + split)


def encode_progress(enabled: bool) -> Callable[..., None]:
    """progress(samples, estimated total) for encode_shards: a tqdm bar in img/s with an ETA
    once the total can be estimated; progress(0, None, close=True) closes it."""
    bar = progress_bar(unit="img", enabled=bar_shown(enabled), desc="encode")

    def update(n: int, total: int | None, close: bool = False) -> None:
        if close:
            bar.total = bar.n  # the estimate ends at what was read
            bar.refresh()
            bar.close()
            return
        if total is not None:
            bar.total = max(total, bar.n + n)
        bar.update(n)

    return update


@main.command("convert-vae")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path(dir_okay=False), callback=safetensors_file)
@click.option("--scaling-factor", type=click.FloatRange(min=0, min_open=True, max=1e6),
              help="Latent scale [default: config.json's scaling_factor; 0.18215 for LDM files].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@data_errors
def convert_vae(src: str, out: str, scaling_factor: float | None, overwrite: bool) -> None:
    """Convert a Stable Diffusion VAE into a t2i vae.safetensors that every t2i tool reads
    (t2i-train --vae, t2i-data encode --vae). SRC: a diffusers AutoencoderKL folder
    (config.json + diffusion_pytorch_model.safetensors) or an LDM / SD checkpoint file
    (.safetensors, .ckpt; its VAE may sit under first_stage_model.)."""
    from pathlib import Path

    from t2i.models.vae_files import is_t2i_vae, write_imported_vae

    if Path(out).exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it")
    if not Path(src).exists():
        raise UserError(f"{src}: no such file or folder")
    if is_t2i_vae(src):
        raise UserError(f"{src} is a t2i VAE already: use it as it is")
    vae = write_imported_vae(src, out, scaling_factor)
    cfg = vae.cfg
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    params = sum(p.numel() for p in vae.parameters())
    click.echo(f"wrote {out}: f{cfg.downsample_factor}, z_channels {cfg.z_channels}, widths "
               f"{widths}, num_res_blocks {cfg.num_res_blocks}, {params / 1e6:.1f}M "
               f"parameters, latent_scale {vae.latent_scale.item():.6g}")


if __name__ == "__main__":
    main()
