"""`t2i-sample RUN_OR_CHECKPOINT PROMPT... --out DIR`: PNGs named by prompt and seed, plus a grid."""

from __future__ import annotations

import re
from pathlib import Path

import click
import torch
from PIL import Image

from t2i.cli.common import UserError, user_errors
from t2i.sample import compile_pipeline, generate, load_pipeline, make_grid


def slug(prompt: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "empty"


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    out = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise UserError(f"--prompts {prompts_file}: no such file")
        out += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not out:
        raise UserError("give at least one prompt (arguments or --prompts FILE)")
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run", type=click.Path())
@click.argument("prompts", nargs=-1)
@click.option("--prompts", "prompts_file", type=click.Path(), help="file with one prompt per line")
@click.option("--out", default="samples", show_default=True, type=click.Path())
@click.option("--negative", default="", help="negative prompt (replaces the empty prompt in CFG)")
@click.option("--guidance", type=float, help="CFG scale; 1 disables the unconditional pass "
              "[default: the run's train.sample_guidance]")
@click.option("--sampler", type=click.Choice(["pndm", "lms"]), default="pndm", show_default=True)
@click.option("--steps", default=50, show_default=True)
@click.option("--seed", default=0, show_default=True, help="image i uses seed + i")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--height", type=int, help="multiple of the VAE x UNet factor [default: training size]")
@click.option("--width", type=int)
@click.option("--ema/--no-ema", default=True, show_default=True, help="EMA or raw weights")
@click.option("--init-image", type=click.Path(), help="img2img: start from this image")
@click.option("--strength", default=0.8, show_default=True, help="img2img: 0 keeps the image, 1 ignores it")
@click.option("--device", default=None, help="cpu | cuda [default: cuda if available]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True, help="autocast for the UNet and text encoder (auto: bf16 on CUDA)")
@click.option("--compile", "compile_unet", is_flag=True,
              help="torch.compile the UNet (with CUDA graphs on CUDA)")
@user_errors
def main(run: str, prompts: tuple[str, ...], prompts_file: str | None, out: str, negative: str,
         guidance: float | None, sampler: str, steps: int, seed: int, batch_size: int,
         height: int | None, width: int | None, ema: bool, init_image: str | None,
         strength: float, device: str | None, precision: str, compile_unet: bool) -> None:
    """Generate images from a trained run."""
    texts = read_prompts(prompts, prompts_file)
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if init_image and not Path(init_image).is_file():
        raise UserError(f"--init-image {init_image}: no such file")
    pipe = load_pipeline(run, ema=ema, device=device)
    pipe = compile_pipeline(pipe) if compile_unet else pipe
    image = Image.open(init_image) if init_image else None
    try:
        result = generate(pipe, texts, negative=negative, sampler=sampler, steps=steps,
                          guidance=pipe.guidance(guidance), seed=seed, batch_size=batch_size,
                          height=height, width=width, init_image=image, strength=strength,
                          precision=precision)
    except ValueError as err:
        raise UserError(str(err)) from err
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for img, prompt, s in zip(result.images, result.prompts, result.seeds):
        path = out_dir / f"{slug(prompt)}-seed{s}.png"
        img.save(path)
        click.echo(f"seed {s}: {path}")
    import numpy as np
    make_grid(np.stack([np.asarray(i) for i in result.images])).save(out_dir / "grid.png")
    click.echo(f"grid: {out_dir / 'grid.png'}")


if __name__ == "__main__":
    main()
