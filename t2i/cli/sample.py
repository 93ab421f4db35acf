"""`t2i-sample RUN_OR_CHECKPOINT PROMPT... --out DIR`: PNGs named by prompt and seed, plus a grid."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click
import numpy as np
from PIL import Image

from t2i.cli.common import (FiniteFloat, OneLineCommand, UserError, check_writable, output_dir,
                            pick_device, progress_bar, set_threads, user_errors)
from t2i.data.errors import DataError
from t2i.data.transforms import load_image
from t2i.config import PRECISIONS, field_rule
from t2i.sample import SAMPLERS, Generation, compile_pipeline, generate, load_pipeline, make_grid


GRID = "grid.png"


def slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "empty"


def image_name(prompt: str, seed: int) -> str:
    """The file name of the image of `prompt` drawn with `seed` in the --out folder."""
    return f"{slug(prompt)}-seed{seed}.png"


def output_names(out: str, prompts: list[str], seed: int, overwrite: bool) -> list[str]:
    """Every file a call writes into `out`, in writing order: image i (seed + i), then the grid.
    Nothing is lost: unless `overwrite`, a name already taken in `out` becomes the first free
    STEM-2.png, STEM-3.png, ... (a second call into one folder keeps the first call's grid)."""
    names = [image_name(p, seed + i) for i, p in enumerate(prompts)] + [GRID]
    return names if overwrite else [free_name(Path(out), name) for name in names]


def free_name(folder: Path, name: str) -> str:
    """`name`, or STEM-k.png with the smallest k >= 2 that `folder` does not hold."""
    stem, suffix = os.path.splitext(name)
    k = 1
    while os.path.lexists(folder / name):
        k += 1
        name = f"{stem}-{k}{suffix}"
    return name


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """The prompt arguments, then the lines of the --prompts file. Raises UserError when there
    is none, or as prompt_lines does."""
    out = list(prompts) + (prompt_lines(prompts_file) if prompts_file else [])
    if not out:
        raise UserError("give at least one prompt (arguments or --prompts FILE)")
    return out


def prompt_lines(path: str) -> list[str]:
    """The non-blank lines, stripped, of a --prompts file read as UTF-8 (a BOM is dropped).
    Raises UserError naming the file when it is missing, a folder, unreadable, not UTF-8 text
    or holds no prompt."""
    if Path(path).is_dir():
        raise UserError(f"--prompts {path!r} is a folder, not a file with one prompt per line")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError as err:
        raise UserError(f"--prompts {path!r}: no such file") from err
    except UnicodeDecodeError as err:
        raise UserError(f"--prompts {path!r} is not UTF-8 text (bad byte at offset {err.start}); "
                        f"save it as UTF-8, one prompt per line") from err
    except OSError as err:
        raise UserError(f"--prompts {path!r}: cannot read it ({err.strerror})") from err
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--prompts {path!r} holds no prompt (one prompt per line; blank lines "
                        f"are skipped)")
    return lines


# torch generators take 64-bit seeds: t2i-train's train.seed range, for every image's seed
SEED = field_rule("train.seed")[1]


def check_seeds(seed: int, images: int) -> None:
    """Image i uses seed + i: the last one, seed + images - 1, must stay a legal seed too.
    Raises UserError naming --seed (--seed itself is ranged by its click type, SEED)."""
    if seed + images - 1 > SEED.high:
        raise UserError(f"--seed {seed}: image i uses seed + i, and seed + {images - 1} passes "
                        f"the largest seed {SEED.high} (2^63 - 1); use --seed "
                        f"{SEED.high - images + 1} or less")


def read_init_image(path: str | None) -> Image.Image | None:
    """The --init-image as upright RGB (EXIF orientation applied), read before any model loads;
    an unreadable, truncated or oversized image is one line naming the file."""
    if path is None:
        return None
    try:
        return load_image(path)
    except DataError as err:
        raise UserError(f"--init-image: {err}") from err


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", type=click.Path())
@click.argument("prompts", nargs=-1)
@click.option("--prompts", "prompts_file", type=click.Path(), help="file with one prompt per line")
@click.option("--out", default="samples", show_default=True, type=click.Path(file_okay=False),
              callback=output_dir)
@click.option("--negative", default="", help="negative prompt (replaces the empty prompt in CFG)")
@click.option("--guidance", type=FiniteFloat(min=0), help="CFG scale; 1 disables the "
              "unconditional pass [default: the run's train.sample_guidance]")
@click.option("--sampler", type=click.Choice(list(SAMPLERS)), default="pndm", show_default=True)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(min=1),
              help="at most the run's schedule.num_train_timesteps")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(SEED.low, SEED.high),
              help="image i uses seed + i (0 to 2^63 - 1)")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--height", type=click.IntRange(min=1),
              help="multiple of the VAE x UNet factor [default: training size]")
@click.option("--width", type=click.IntRange(min=1))
@click.option("--ema/--no-ema", default=True, show_default=True, help="EMA or raw weights")
@click.option("--init-image", type=click.Path(), help="img2img: start from this image")
@click.option("--strength", default=0.8, show_default=True, type=FiniteFloat(0, 1),
              help="img2img: 0 keeps the image, 1 ignores it")
@click.option("--device", default=None, help="cpu | cuda | cuda:N [default: cuda if available]")
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto",
              show_default=True, help="autocast for the UNet and text encoder (auto: bf16 on CUDA)")
@click.option("--compile", "compile_unet", is_flag=True,
              help="torch.compile the UNet (with CUDA graphs on CUDA)")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [default: OMP_NUM_THREADS, else the usable cores]")
@click.option("--overwrite", is_flag=True,
              help="Replace same-named PNGs and grid.png in --out [default: write NAME-2.png, "
                   "NAME-3.png, ... beside them].")
@user_errors
def main(run: str, prompts: tuple[str, ...], prompts_file: str | None, out: str, negative: str,
         guidance: float | None, sampler: str, steps: int, seed: int, batch_size: int,
         height: int | None, width: int | None, ema: bool, init_image: str | None,
         strength: float, device: str | None, precision: str, compile_unet: bool,
         threads: int | None, overwrite: bool) -> None:
    """Generate images from a trained run into --out: PROMPT-seedS.png per image, grid.png.
    A name already taken in --out gets the first free -2, -3, ... suffix (see --overwrite)."""
    texts = read_prompts(prompts, prompts_file)
    check_seeds(seed, len(texts))
    target = pick_device(device)
    image = read_init_image(init_image)
    check_writable(out)
    names = output_names(out, texts, seed, overwrite)
    set_threads(threads)
    pipe = load_pipeline(run, ema=ema, device=target)
    pipe = compile_pipeline(pipe) if compile_unet else pipe
    out_dir = Path(out)  # made when the first image is written: a refused call leaves none
    with progress_bar(len(texts), bar_format=SAMPLE_BAR) as bar:
        written = [0]  # images written so far; the bar moves within a batch at every step

        def write(part: Generation) -> None:  # each batch as soon as it is decoded
            for img, s in zip(part.images, part.seeds):
                path = save(img, out_dir / names[s - seed])
                bar.write(f"seed {s}: {path}", file=sys.stdout)
            written[0] += len(part.images)
            bar.n = written[0]
            bar.refresh()

        def step(i: int, n: int) -> None:
            rows = min(batch_size, len(texts) - written[0])
            bar.n = written[0] + rows * i / n
            bar.refresh()

        try:
            result = generate(pipe, texts, negative=negative, sampler=sampler, steps=steps,
                              guidance=pipe.guidance(guidance), seed=seed, batch_size=batch_size,
                              height=height, width=width, init_image=image, strength=strength,
                              precision=precision, on_batch=write, on_step=step)
        except ValueError as err:
            raise UserError(str(err)) from err
    grid = make_grid(np.stack([np.asarray(i) for i in result.images]))
    click.echo(f"grid: {save(grid, out_dir / names[-1])}")


# the image count with one decimal: within a batch the bar moves at each denoising step
SAMPLE_BAR = "{l_bar}{bar}| {n:.1f}/{total_fmt} img [{elapsed}<{remaining}, {rate_fmt}]"


def save(image: Image.Image, path: Path) -> Path:
    """Write `image` as `path`, making its folder (the --out folder) if need be. Raises
    UserError naming --out when it cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    except OSError as err:
        raise UserError(f"--out {str(path.parent)!r}: cannot write {path.name} "
                        f"({err.strerror or err})") from err
    return path


if __name__ == "__main__":
    main()
