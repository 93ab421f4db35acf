"""What several test modules share: the micro configs and a one-call training run, toy train
states, bitwise comparisons and the one-line CLI error check. Imported by name
(`from helpers import micro_cfg`); the trained runs built from these are session fixtures in
conftest.py."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from click.testing import CliRunner, Result
from PIL import Image

from t2i.cli.launch import launch
from t2i.config import apply_overrides, get_preset
from t2i.train.run import Run
from t2i.train.state import init_train_state
from t2i.train.step import StepSettings

# The model widths at their minimum, shared by both micro configs.
MICRO_WIDTHS = [
    "vae.base_channels=8", "vae.norm_groups=4",
    "unet.base_channels=16", "unet.channel_mult=1,2", "unet.attention_levels=false,true",
    "unet.num_heads=2", "unet.norm_groups=4", "unet.context_dim=32",
    "text.width=32", "text.layers=1", "text.heads=2", "text.frozen=false",
    "train.batch_size=4", "train.keep_last=0",
]

# 16x16 images, f4 VAE: both stages train in seconds on one CPU thread.
MICRO = ["data.resolution=16", "vae.channel_mult=1,2", *MICRO_WIDTHS,
         "train.vae_steps=4", "train.unet_steps=4", "train.warmup_steps=2",
         "train.save_every=2", "train.sample_every=0"]

# 32x32 images, f8 VAE (-> 4x4 latents) so "a multiple of 8" is the VAE factor; the UNet halves
# once more, so sizes must be multiples of 16. Two VAE steps, three UNet steps, a sample grid at
# the last step with the run's own guidance and seed.
MICRO_F8 = ["data.resolution=32", "vae.channel_mult=1,1,2,2", *MICRO_WIDTHS,
            "train.vae_steps=2", "train.unet_steps=3", "train.warmup_steps=1",
            "train.save_every=3", "train.sample_every=3", "train.ema_decay=0.5",
            "train.sample_guidance=2.5", "train.seed=7"]


def micro_cfg(*extra: str):
    """The tiny preset with MICRO and then `extra` overrides applied."""
    return apply_overrides(get_preset("tiny"), MICRO + list(extra))


def micro_f8_cfg(*extra: str):
    """The tiny preset with MICRO_F8 and then `extra` overrides applied."""
    return apply_overrides(get_preset("tiny"), MICRO_F8 + list(extra))


def run_stage(cfg, out: Path, resume: bool = False, vae: str | None = None) -> int:
    """Train `cfg` into the run folder `out` on the CPU, as t2i-train does; the exit status."""
    return launch(cfg, Run(out), resume, torch.device("cpu"), vae, log_every=1,
                  show_progress=False)


def toy_state():
    """A TrainState of a 3 -> 1 linear model (AdamW, lr 0.1, fp32, CPU)."""
    return init_train_state(torch.nn.Linear(3, 1), lr=0.1, weight_decay=0.0, seed=0,
                            precision="fp32", device=torch.device("cpu"))


def toy_settings(**kw):
    """StepSettings for toy_state: constant lr 0.1, no warmup, clip 1, EMA 0.9, fp32 on CPU."""
    base = dict(base_lr=0.1, warmup_steps=0, total_steps=10, lr_schedule="constant",
                grad_clip=1.0, grad_accum=1, ema_decay=0.9, ema_warmup=True, autocast_dtype=None,
                device=torch.device("cpu"))
    return StepSettings(**{**base, **kw})


def assert_bitwise_equal(a: dict, b: dict) -> None:
    """Two state dicts with the same keys and bitwise-equal tensors."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN (a scheduler table's past-the-end row is NaN)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def snapshot(state) -> dict[str, torch.Tensor]:
    """Copies of the tensor fields of a scheduler state (to check a step leaves them alone)."""
    return {k: v.clone() for k, v in vars(state).items() if isinstance(v, torch.Tensor)}


def fresh_x(shape=(2, 3), seed: int = 0) -> torch.Tensor:
    """A float64 standard-normal sample from its own generator."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def invoke(cli, *args) -> Result:
    """Run a click command in-process with the arguments as strings."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def error_line(output: str) -> str:
    """The one `Error...` line of a command's output (no traceback)."""
    assert "Traceback" not in output, output
    [line] = [x for x in output.splitlines() if x.startswith("Error")]
    return line


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    """The bytes of `image` saved in format `fmt` (PIL save options in kw)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Image shards in the real layout and latent shards made from them (t2i/data/latent_shards.py)
# ----------------------------------------------------------------------------------------------


def write_image_shards(folder: Path, shards: int, per_shard: int, size: int = 24,
                       colour: tuple[int, int, int] | None = None, seed: int = 0) -> Path:
    """Shards in the text-to-image-2M layout (data_000000.tar, ...: KEY.jpg + KEY.json
    {"prompt"}), keys 000000000, 000000001, ... counted from 0 in every folder (as two folders
    packed separately are). Each image is a plain `colour`, else a random smooth gradient."""
    import numpy as np

    from t2i.data.pack import ShardWriter, jpeg_bytes, sample_json

    rng = np.random.default_rng(seed)
    with ShardWriter(folder, per_shard) as writer:
        for i in range(shards * per_shard):
            if colour is None:
                base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(base).resize((size, size), Image.Resampling.BILINEAR)
            else:
                image = Image.new("RGB", (size, size), colour)
            writer.write(f"{i:09d}", {"jpg": jpeg_bytes(image, 95),
                                      "json": sample_json(f"picture number {i}", width=size)})
    return Path(folder)


def save_random_vae(cfg, path: Path, latent_scale: float = 0.7) -> Path:
    """An untrained VAE of `cfg` (initialised from cfg.train.seed) saved as t2i-train exports
    one: enough for stage-2 mechanics, much faster than stage 1."""
    from t2i.config import to_json
    from t2i.models.io import save_weights
    from t2i.train.vae_stage import build_vae

    vae = build_vae(cfg, torch.device("cpu"))
    vae.latent_scale.fill_(latent_scale)
    save_weights(path, vae.state_dict(), {"config": to_json(cfg), "stage": "vae"})
    return path


def step_moments(cfg, vae_path: Path, steps: int) -> dict:
    """{(shard path, key): (2z, h, w) moments} of every sample of the first `steps` stage-2
    batches of `cfg` on one process, each batch encoded whole as the online step encodes it
    (a conv's last bits can depend on the batch it runs in)."""
    from t2i.train.distributed import World
    from t2i.train.env import Env, make_loader
    from t2i.train.vae_stage import load_vae

    vae = load_vae(cfg, vae_path, torch.device("cpu"))
    loader = iter(make_loader(cfg, Env(torch.device("cpu"), World(), resume=False), None,
                              "unet-data"))
    found = {}
    with torch.no_grad():
        for _ in range(steps):
            batch = next(loader)
            post = vae.encode(batch["image"])
            moments = torch.cat([post.mean, post.logvar], dim=1)  # (B, 2z, h, w)
            found.update(zip(zip(batch["shard"], batch["key"]), moments))
    return found


def write_latent_shards(image_dir: Path, out: Path, cfg, vae_path: Path, dtype: str = "fp32",
                        known: dict | None = None) -> Path:
    """Latent shards of the image shards in `image_dir` (same shard names, keys and order) at
    cfg.data.resolution, centre crop, with `manifest.json`: each sample's moments from `known`
    (see step_moments), else the VAE encodes it alone. A stand-in for `t2i-data encode`."""
    import json
    import tarfile

    from t2i import __version__
    from t2i.data.latent_shards import LatentManifest, moments_bytes, moments_extension
    from t2i.data.shards import ShardIssue, decode_example, read_shard
    from t2i.data.transforms import Transform, to_float
    from t2i.models.vae_files import vae_sha256
    from t2i.train.vae_stage import load_vae

    known = known or {}
    res = cfg.data.resolution
    vae = load_vae(cfg, vae_path, torch.device("cpu"))
    out.mkdir(parents=True)
    counts = {}
    for path in sorted(image_dir.glob("*.tar")):
        n = 0
        with tarfile.open(out / path.name, "w", format=tarfile.USTAR_FORMAT) as tar:
            for item in read_shard(str(path)):
                if isinstance(item, ShardIssue):  # an empty shard: an empty latent shard
                    continue
                example = item[1]
                key = example["__key__"]
                moments = known.get((str(path), key))
                if moments is None:
                    image, _, _ = decode_example(example, Transform(res), 0)
                    with torch.no_grad():
                        post = vae.encode(to_float(image[None].copy()))
                    moments = torch.cat([post.mean, post.logvar], dim=1)[0]  # (2z, h, w)
                meta = {**json.loads(example["json"]), "source_shard": path.name,
                        "source_key": key}
                files = {"json": json.dumps(meta).encode(),
                         moments_extension(res): moments_bytes(moments, dtype)}
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        counts[path.name] = {"samples": n, "bytes": (out / path.name).stat().st_size, "bad": {}}
    manifest = LatentManifest(
        vae_sha256=vae_sha256(vae_path), latent_scale=float(vae.latent_scale),
        z_channels=cfg.vae.z_channels, downsample_factor=cfg.vae.downsample_factor,
        resolutions=(res,), dtype=dtype, crop="center", source=str(image_dir),
        source_shards_digest="", shards=counts, t2i_version=__version__)
    (out / "manifest.json").write_text(manifest.to_json())
    return out
