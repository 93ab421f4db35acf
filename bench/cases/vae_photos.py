"""`vae-photos`: stage 1 on real photographs, L1+KL against L1+KL plus the adversarial term.

The photos ship inside scikit-image (`skimage.data`, no download): each is scaled (Lanczos,
never up) so its shorter side is `Settings.scale_side`. Training: `Settings.train_crops` random
square crops at the training resolution from TRAIN_PHOTOS, written as PNG files with a caption
each and packed into shards by `t2i.data.pack.pack_folder` (what `t2i-data pack --keep-format`
does), then stage 1 of the `small` preset (narrowed to `Settings.width` base channels, see
`run_overrides`) trained by `t2i-train` itself (`python -m t2i.cli.train --preset small --set
...`, one subprocess per run) into a run folder; its exported `vae.safetensors` (EMA weights) is
what is measured. On a CPU the two runs train at the same time, each with half of `--threads`
(at least 1 thread), so the comparison takes the wall time of one run; on CUDA one after the
other. Both runs use the same seed, data order, steps, batch and learning rate (constant after
the warm-up: a cosine decay would leave the adversarial term, which starts part-way, almost no
learning rate) and the `small` preset's AdamW betas (0.5, 0.9), LDM's; the adversarial run
sets `GAN_KEYS` (the PatchGAN hinge term with LDM's adaptive weight, see t2i/train/gan.py) with
vae.disc_weight > 0, the other with 0: that is their only difference.

Evaluation: every non-overlapping tile at the training resolution of the HELD_OUT photos (never
seen in training), through `t2i.eval.reconstruction_metrics`, the function behind `t2i-eval
--suite vae`: PSNR, SSIM and the sharpness ratio (high-frequency spectral energy of the
reconstructions over that of the originals, `t2i.eval.highfreq_energy`). The goal of issue 15:
the adversarial run's ratio at least 0.15 closer to 1 than the L1 run's, PSNR within 1 dB.
Rows: one per run (`train_s` is its wall time, start-up and export included) and a `goal` row.
A side-by-side PNG (rows: original, L1, GAN; the held-out tiles with the most high-frequency
energy, 3x nearest-neighbour) is written to `--out` as `vae-photos-MACHINE-DATE.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.core import (REPO_ROOT, BenchContext, SkipCase, environment, machine_slug,
                        register_case)
from t2i.config import Config, apply_overrides, get_preset
from t2i.config.sections import VAEConfig

TRAIN_PHOTOS = ("astronaut", "rocket", "motorcycle", "hubble_deep_field", "immunohistochemistry",
                "retina", "camera", "brick", "grass", "moon", "coins")
HELD_OUT = ("chelsea", "coffee", "gravel")
GAN_KEYS = ("disc_weight", "disc_start", "disc_layers")  # the VAEConfig fields the case sets
CAPTION = "a photo"  # stage 1 reads no captions; the shard format wants one


@dataclass(frozen=True)
class Settings:
    """One comparison's sizes. `width`: vae.base_channels (the small preset's is 64);
    `disc_start`, `disc_weight`: the adversarial run's vae.* values."""

    resolution: int = 64
    width: int = 16
    norm_groups: int = 8
    steps: int = 800
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 20
    lr_schedule: str = "constant"
    train_crops: int = 2048
    scale_side: int = 256
    disc_start: int = 200
    disc_weight: float = 0.4
    disc_layers: int = 1  # 16-pixel patches (see docs/vae.md for the settings tried)
    seed: int = 0
    max_tiles: int = 0  # 0: every held-out tile
    shown: int = 8  # tiles in the side-by-side PNG


def settings_for(ctx: BenchContext) -> Settings:
    """--quick: a few steps at the smallest width (tests); on CUDA: 256 px, the preset's width,
    longer; else the CPU sizes (each run a few minutes on 2 cores). --resolution and --batch
    override."""
    if ctx.quick:
        base = Settings(width=8, steps=3, batch=2, warmup=1, train_crops=8, disc_start=1,
                        max_tiles=6, shown=3)
    elif ctx.torch_device.type == "cuda":
        base = Settings(resolution=256, width=64, norm_groups=32, steps=3000, batch=8, lr=2e-4,
                        warmup=100, train_crops=4096, scale_side=512, disc_start=1500,
                        disc_layers=3)
    else:
        base = Settings()
    return dataclasses.replace(base, resolution=ctx.resolution or base.resolution,
                               batch=ctx.batch or base.batch)


# ----------------------------------------------------------------------------------------------
# Photos and crops
# ----------------------------------------------------------------------------------------------


def load_photo(name: str, scale_side: int) -> np.ndarray:
    """skimage.data's photo `name` as (H, W, 3) uint8 (grey ones repeated), scaled with Lanczos
    so that its shorter side is `scale_side` (never enlarged)."""
    from skimage import data
    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = Image.fromarray(array).convert("RGB")
    scale = min(1.0, scale_side / min(image.size))
    if scale < 1.0:
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image)


def random_crops(photos: list[np.ndarray], count: int, side: int, seed: int) -> list[np.ndarray]:
    """`count` (side, side, 3) crops: photo and position uniform, from one seeded generator."""
    gen = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        photo = photos[gen.integers(len(photos))]
        top = gen.integers(photo.shape[0] - side + 1)
        left = gen.integers(photo.shape[1] - side + 1)
        crops.append(photo[top:top + side, left:left + side])
    return crops


def tiles(photos: list[np.ndarray], side: int) -> torch.Tensor:
    """Every non-overlapping (side, side) tile, row-major, photo by photo -> (N, 3, side, side)
    in [-1, 1]."""
    out = [p[y:y + side, x:x + side] for p in photos
           for y in range(0, p.shape[0] - side + 1, side)
           for x in range(0, p.shape[1] - side + 1, side)]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 127.5 - 1


def pack_crops(crops: list[np.ndarray], folder: Path) -> Path:
    """Crops as lossless PNG + caption files in folder/images, packed into folder/shards the
    way `t2i-data pack --keep-format` does. Returns the shard folder."""
    from t2i.data.pack import pack_folder
    images = folder / "images"
    images.mkdir(parents=True)
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(images / f"{i:06d}.png")
        (images / f"{i:06d}.txt").write_text(CAPTION)
    pack_folder(images, folder / "shards", shard_size=1000, keep_format=True)
    return folder / "shards"


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------


def gan_available() -> bool:
    """Whether this tree's stage 1 has the adversarial term (its config keys)."""
    names = {f.name for f in dataclasses.fields(VAEConfig)}
    return all(key in names for key in GAN_KEYS)


def run_overrides(s: Settings, shards: Path, gan: bool) -> list[str]:
    """`--set` values of the `small` preset's stage 1, narrowed to s.width, at s.resolution on
    `shards`; the adversarial term on (`gan`) or off."""
    overrides = [
        f"data.source={shards}", f"data.resolution={s.resolution}", "data.crop=center",
        "data.hflip=true", "data.workers=0", "data.shuffle_buffer=256",
        f"vae.base_channels={s.width}", f"vae.norm_groups={s.norm_groups}",
        "train.stage=vae", f"train.vae_steps={s.steps}", f"train.batch_size={s.batch}",
        f"train.vae_lr={s.lr}", f"train.warmup_steps={s.warmup}",
        f"train.lr_schedule={s.lr_schedule}", f"train.seed={s.seed}",
        "train.sample_every=0", "train.save_every=0", "train.keep_last=1",
    ]
    if gan_available():  # the runs differ in vae.disc_weight alone
        overrides += [f"vae.disc_weight={s.disc_weight if gan else 0}",
                      f"vae.disc_start={s.disc_start}", f"vae.disc_layers={s.disc_layers}"]
    return overrides


def run_config(s: Settings, shards: Path, gan: bool) -> Config:
    """The Config `t2i-train --preset small --set ...` builds from `run_overrides`."""
    return apply_overrides(get_preset("small"), run_overrides(s, shards, gan))


def train_command(overrides: list[str], out: Path, device: torch.device,
                  threads: int) -> list[str]:
    """The t2i-train command line of one run (this interpreter, `-m t2i.cli.train`)."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    return [sys.executable, "-m", "t2i.cli.train", "--preset", "small", *sets, "--out",
            str(out), "--device", str(device), "--threads", str(threads), "--log-every", "50"]


def train_all(jobs: list[tuple[list[str], Path]], device: torch.device,
              parallel: bool) -> list[float]:
    """Run `t2i-train` once per (overrides, run folder), all at once when `parallel` (each
    with this process's torch threads split between them, at least 1), else one after the
    other; output into RUN.log beside each run folder. Returns each run's wall seconds.
    Raises RuntimeError naming the log of a run that failed."""
    threads = max(1, torch.get_num_threads() // (len(jobs) if parallel else 1))
    groups = [jobs] if parallel else [[job] for job in jobs]
    return [t for group in groups for t in run_group(group, device, threads)]


def run_group(group: list[tuple[list[str], Path]], device: torch.device,
              threads: int) -> list[float]:
    """Start every run of `group`, wait for all; each one's wall seconds. A failed run (or an
    interrupt) stops the others of the group before the error goes on."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started, procs = time.perf_counter(), []
    try:
        for overrides, out in group:
            with open(out.with_suffix(".log"), "w") as log:  # the child keeps its own handle
                procs.append(subprocess.Popen(train_command(overrides, out, device, threads),
                                              stdout=log, stderr=subprocess.STDOUT, env=env,
                                              cwd=REPO_ROOT))
        seconds = []
        for proc, (_, out) in zip(procs, group):
            if proc.wait() != 0:
                raise RuntimeError(f"t2i-train exited with status {proc.returncode}; see "
                                   f"{out.with_suffix('.log')}")
            seconds.append(time.perf_counter() - started)
        return seconds
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


LOGGED = ("rec_loss", "gan_g", "gan_d", "logits_real", "logits_fake", "adaptive_weight")


def last_logged(run_dir: Path) -> dict:
    """The stage-1 terms of the run's last metrics.jsonl record (the mean over its last log
    interval), those it has, as `log_NAME`."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1]) if lines else {}
    return {f"log_{k}": record[k] for k in LOGGED if k in record}


@torch.no_grad()
def evaluate(run_dir: Path, held_out: torch.Tensor, device: torch.device,
             batch: int = 32) -> tuple[dict, torch.Tensor]:
    """reconstruction_metrics of the run's exported VAE on `held_out`, and the
    reconstructions (N, 3, H, W) in [-1, 1] on the CPU."""
    from t2i.eval import reconstruct, reconstruction_metrics
    from t2i.models.vae_files import open_vae
    vae = open_vae(run_dir).to(device)
    report = reconstruction_metrics(vae, held_out.split(batch), device)
    recon = torch.cat([reconstruct(vae, x.to(device)).cpu() for x in held_out.split(batch)])
    return report, recon


def side_by_side(rows: list[torch.Tensor], shown: int, zoom: int = 3) -> Image.Image:
    """One PNG: a row per tensor (original, then each run's reconstructions), the `shown`
    tiles whose originals have the most high-frequency energy, enlarged `zoom` x."""
    from t2i.eval import highfreq_energy
    from t2i.sample import make_grid, to_uint8
    order = highfreq_energy(rows[0]).argsort(descending=True)[:shown]
    picked = torch.cat([r[order] for r in rows])  # (len(rows) * shown, 3, H, W)
    picked = picked.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    return make_grid(to_uint8(picked), columns=len(order))


def goal_row(l1: dict, gan: dict) -> dict:
    """How much closer to 1 the adversarial run's sharpness is, and what it cost in PSNR."""
    gain = abs(1 - l1["sharpness"]) - abs(1 - gan["sharpness"])
    drop = l1["psnr_db"] - gan["psnr_db"]
    return {"case": "vae-photos", "name": "goal", "sharpness_gain": gain, "psnr_drop_db": drop,
            "goal_met": bool(gain >= 0.15 and drop <= 1.0),
            "goal": "sharpness >= 0.15 closer to 1, PSNR within 1 dB"}


def result_row(name: str, s: Settings, run_dir: Path, seconds: float,
               report: dict) -> dict:
    """One run's row: its metrics, wall time, settings and last logged loss terms."""
    cfg = json.loads((run_dir / "config.json").read_text())
    gan_keys = {f"vae.{k}": cfg["vae"][k] for k in GAN_KEYS if k in cfg["vae"]}
    betas = {"train.vae_betas": cfg["train"]["vae_betas"]} if "vae_betas" in cfg["train"] else {}
    return {"case": "vae-photos", "name": name, **report, "train_s": seconds, "steps": s.steps,
            "batch": s.batch, "resolution": s.resolution, "width": s.width, "lr": s.lr,
            "lr_schedule": s.lr_schedule, "seed": s.seed, **gan_keys, **betas,
            "held_out": ",".join(HELD_OUT), **last_logged(run_dir)}


def compare(s: Settings, work: Path, device: torch.device, png: Path | None = None,
            variants: tuple[str, ...] = ("L1+KL", "L1+KL+GAN")) -> list[dict]:
    """The runs named in `variants` (the GAN run only where the tree has it, else a `skipped`
    row) in `work`, evaluated on the held-out tiles; with both, a `goal` row; the PNG written
    to `png` when given."""
    train_photos = [load_photo(n, s.scale_side) for n in TRAIN_PHOTOS]
    held_out = tiles([load_photo(n, s.scale_side) for n in HELD_OUT], s.resolution)
    held_out = held_out[:s.max_tiles] if s.max_tiles else held_out  # (N, 3, res, res)
    shards = pack_crops(random_crops(train_photos, s.train_crops, s.resolution, s.seed),
                        work / "data")
    names = [n for n in variants if n == "L1+KL" or gan_available()]
    dirs = [work / name.replace("+", "_") for name in names]
    seconds = train_all([(run_overrides(s, shards, name == "L1+KL+GAN"), d)
                         for name, d in zip(names, dirs)], device, parallel=device.type == "cpu")
    done = [evaluate(d, held_out, device) for d in dirs]
    rows = [result_row(name, s, d, t, report)
            for name, d, t, (report, _) in zip(names, dirs, seconds, done)]
    if len(rows) == 2:
        rows.append(goal_row(rows[0], rows[1]))
    elif "L1+KL+GAN" in variants and not gan_available():
        rows.append({"case": "vae-photos", "name": "L1+KL+GAN",
                     "skipped": f"this tree's VAEConfig has no {' / '.join(GAN_KEYS)}"})
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        side_by_side([held_out] + [recon for _, recon in done], s.shown).save(png)
        rows[0].update(png=str(png), png_rows=" / ".join(["original", *names]))
    return rows


@register_case("vae-photos", in_all=False)
def vae_photos_case(ctx: BenchContext) -> list[dict]:
    try:
        import skimage.data  # noqa: F401
    except ImportError as err:
        raise SkipCase("needs scikit-image (pip install scikit-image: the `dev` extra)") from err
    env = environment(ctx)
    png = ctx.out_dir / f"vae-photos-{machine_slug(env)}-{env['date'][:10]}.png"
    with tempfile.TemporaryDirectory(prefix="vae-photos-") as tmp:
        return compare(settings_for(ctx), Path(tmp), ctx.torch_device, png)

