"""`t2i-data`: pack a folder of captioned images into shards, export the shapes set as shards,
and inspect any source (count, sizes, modes, prompt lengths, bad samples, contact sheet)."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from t2i.cli.common import OneLineGroup, UserError, user_errors
from t2i.data.errors import DataError


def data_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """DataError (bad path, empty folder, offline Hub) -> one line, exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DataError as err:
            raise UserError(str(err)) from err

    return user_errors(wrapper)


def token_counter() -> Callable[[str], int]:
    """Untruncated CLIP BPE length including start and end tokens (the models' tokenizer is
    open_clip's; counting needs the raw encoder, which open_clip exposes)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text)) + 2


def progress_bar(total: int | None, unit: str, enabled: bool):
    from tqdm import tqdm

    return lambda iterable: tqdm(iterable, total=total, unit=unit, disable=not enabled,
                                 file=sys.stderr, dynamic_ncols=True)


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Data tools for t2i: pack, shapes, inspect."""


@main.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--shard-size", default=10_000, show_default=True, type=click.IntRange(min=1),
              help="Samples per shard.")
@click.option("--keep-format", is_flag=True,
              help="Store non-JPEG images as they are instead of converting to JPEG (q95).")
@click.option("--overwrite", is_flag=True,
              help="Replace the shards of an earlier run in OUT (OUT must hold nothing else).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@data_errors
def pack(src: str, out: str, shard_size: int, keep_format: bool, overwrite: bool,
         progress: bool) -> None:
    """Pack SRC (images with same-name .txt captions, or metadata.jsonl with file_name and
    text) into OUT/data_000000.tar ... in the text-to-image-2M layout. OUT must be new or
    empty (or see --overwrite); it appears only once every shard is written."""
    from t2i.data.pack import pack_folder

    report = pack_folder(src, out, shard_size, keep_format, overwrite,
                         progress=progress_bar(None, "img", progress))
    click.echo(report.summary())


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
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
@click.option("--resolution", default=256, show_default=True, type=click.IntRange(min=8),
              help="Training resolution the samples are checked against.")
@click.option("--sheet", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG contact sheet here.")
@click.option("--sheet-count", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@data_errors
def inspect(source: str, subset: str, limit: int | None, resolution: int, sheet: str | None,
            sheet_count: int, as_json: bool, progress: bool) -> None:
    """Report on SOURCE: a folder/glob of shards, hf://owner/name, or URLs."""
    from t2i.data.inspect import format_report, inspect_source, write_sheet
    from t2i.data.sources import resolve_shards

    shards = resolve_shards(source, subset)  # a bad path fails before the tokenizer loads
    report = inspect_source(source, subset, limit=limit, resolution=resolution,
                            sheet_count=sheet_count if sheet else 0,
                            count_tokens=token_counter(),
                            progress=progress_bar(limit, "sample", progress), shards=shards)
    info = report.as_dict()
    if sheet:
        info["sheet"] = str(write_sheet(report, sheet))
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))
    if sheet and not as_json:
        click.echo(f"contact sheet {info['sheet']} ({len(report.sheet)} samples)")


if __name__ == "__main__":
    main()
