"""Latent shards: the on-disk format `t2i-data encode` writes and stage 2 streams.

A latent-shard folder holds webdataset tar shards in the text-to-image-2M layout (one output
shard per input shard, same file name) plus `manifest.json`. Each sample is

    KEY.json                      the source sample's JSON fields, plus "source_shard" (the input
                                  shard's file name) and "source_key" (its key there)
    KEY.moments{R}.safetensors    per resolution R: one tensor "moments" (2 * z, R / f, R / f),
                                  the VAE posterior's mean (first z channels) then logvar (last z),
                                  in the manifest's dtype (fp16, bf16 or fp32)

Moments, not a latent sample, are stored (the layout of LDM's DiagonalGaussianDistribution), so
a training step still draws `mean + exp(logvar / 2) * eps` from its own generator: training from
latent shards is the same computation as training online. safetensors (not .npy) because it is
self-describing and stores bf16.

`manifest.json` (see `LatentManifest`) says which VAE and settings made the moments; a run
refuses shards whose VAE or resolution differ from its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from t2i.data.errors import BadSample, DataError
from t2i.data.shards import DUPLICATE, ShardIssue, is_tar_file, parse_prompt, read_shard
from t2i.data.sources import Shard, is_empty_shard

FORMAT = "t2i-latent-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def moments_extension(resolution: int) -> str:
    """The (lower-case) extension of a sample's moments file at `resolution`."""
    return f"moments{resolution}.safetensors"


def moments_bytes(moments: torch.Tensor, dtype: str) -> bytes:
    """(2z, h, w) moments -> the bytes of a KEY.moments{R}.safetensors file, cast to `dtype`."""
    return save_tensors({"moments": moments.detach().to("cpu", DTYPES[dtype]).contiguous()})


def moments_from_bytes(data: bytes) -> torch.Tensor:
    """The (2z, h, w) float32 moments of a KEY.moments{R}.safetensors file. Raises
    BadSample("corrupt_latent") when the bytes are not such a file or hold NaN or inf."""
    try:
        moments = load_tensors(data)["moments"]
    except (SafetensorError, KeyError, ValueError) as err:
        raise BadSample("corrupt_latent", f"{type(err).__name__}: {err}") from None
    if moments.ndim != 3 or moments.shape[0] % 2:
        raise BadSample("corrupt_latent", f"moments of shape {tuple(moments.shape)}, expected "
                                          "(2z, h, w)")
    if not torch.isfinite(moments).all():  # one would make the whole step non-finite (skipped)
        raise BadSample("corrupt_latent", "non-finite moments (NaN or inf)")
    return moments.float()


@dataclass(frozen=True)
class LatentManifest:
    """What made a latent-shard folder. `shards` maps each output shard's file name to
    {"samples": n, "bad": {kind: n}}; `bad_by_kind` sums those."""

    vae_sha256: str
    latent_scale: float
    z_channels: int
    downsample_factor: int
    resolutions: tuple[int, ...]
    dtype: str
    crop: str
    source: str
    source_shards_digest: str
    shards: dict = field(default_factory=dict)
    bad_by_kind: dict = field(default_factory=dict)
    precision: str = ""  # the encoder's autocast dtype (fp32, bf16, fp16): it changes the values
    t2i_version: str = ""
    format: str = FORMAT
    version: int = FORMAT_VERSION

    @property
    def samples(self) -> int:
        return sum(int(s["samples"]) for s in self.shards.values())

    def settings(self) -> dict:
        """The fields a re-run of `t2i-data encode` into the same folder must match."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("shards", "bad_by_kind", "t2i_version")}

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "resolutions": list(self.resolutions)}, indent=2,
                          sort_keys=True)


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST


def is_latent_source(source: str) -> bool:
    """True when `source` is one local folder holding a latent-shard manifest."""
    return "," not in source and "://" not in source and manifest_path(source).is_file()


def read_manifest(folder: str | Path) -> LatentManifest:
    """The manifest of a latent-shard folder. Raises DataError naming the file when it is
    missing, not JSON, of another format or version, or lacks a field."""
    path = manifest_path(folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{str(path)!r} does not exist: not a latent-shard folder (make one "
                        f"with t2i-data encode)") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{str(path)!r} is not a readable JSON manifest ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{str(path)!r} is not a {FORMAT} manifest")
    if data.get("version") != FORMAT_VERSION:
        raise DataError(f"{str(path)!r} has format version {data.get('version')!r}; this t2i "
                        f"reads version {FORMAT_VERSION}: encode the shards again")
    try:
        manifest = LatentManifest(**{**data, "resolutions": tuple(int(r) for r in
                                                                  data["resolutions"])})
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{str(path)!r} is missing or has a bad field ({err})") from None
    shards = manifest.shards if isinstance(manifest.shards, dict) else {"shards": None}
    bad = next((name for name, record in shards.items() if not is_record(record)), None)
    if bad is not None:
        raise DataError(f"{str(path)!r} has a bad shard entry ({bad}: it needs samples and bad "
                        f"counts): encode the shards again")
    return manifest


def is_record(record: object) -> bool:
    """True for a shard record as `t2i-data encode` writes one: {"samples": n, "bad": {...},
    ...}."""
    return (isinstance(record, dict) and isinstance(record.get("samples"), int)
            and isinstance(record.get("bad"), dict))


def decode_latent_example(example: dict, resolution: int, shape: tuple[int, int, int]
                          ) -> tuple[torch.Tensor, str]:
    """A raw latent-shard example (see shards.group_samples) -> (its moments at `resolution`,
    (2z, h, w) float32 of `shape`, its prompt). Raises BadSample: "duplicate_file",
    "no_latent" (no KEY.moments{R}.safetensors), "corrupt_latent" (not such a file, or moments
    of another shape), or a caption kind of shards.parse_prompt."""
    if DUPLICATE in example:
        raise BadSample("duplicate_file", f"two .{example[DUPLICATE]} files under one key")
    data = example.get(moments_extension(resolution))
    if data is None:
        raise BadSample("no_latent", f"no KEY.{moments_extension(resolution)}")
    prompt = parse_prompt(example)
    moments = moments_from_bytes(data)
    if tuple(moments.shape) != tuple(shape):
        raise BadSample("corrupt_latent", f"moments of shape {tuple(moments.shape)}, the "
                                          f"manifest says {tuple(shape)}")
    return moments, prompt


def holds_latent_samples(folder: str | Path) -> bool:
    """True when the first .tar shard of local folder `folder` starts with a sample holding a
    moments file: latent shards, with or without their manifest (an unfinished `t2i-data
    encode` has written shards but no manifest yet). Reads one sample."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        return False
    tars = sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar" and p.is_file())
    return bool(tars) and is_latent_shard(tars[0])


def holds_latents(source: str) -> bool:
    """True when the local `source` is a latent-shard folder (with or without its manifest) or
    one latent .tar shard."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.suffix.lower() == ".tar" and is_latent_shard(path)
    return is_latent_source(source) or holds_latent_samples(source)


def is_latent_shard(tar: Path) -> bool:
    """True when the .tar file `tar` starts with a sample holding a moments file. Reads one
    sample."""
    return shard_contents(tar) == "latent"


def shard_contents(tar: Path) -> str:
    """What the local file `tar` holds, judged by its first sample: "latent" (it has a moments
    file), "other" (a readable sample without one: an image shard), "none" (a tar without
    samples) or "damaged" (no tar, or cut inside its first sample). Reads one sample."""
    reader = read_shard(str(tar))
    try:
        first = next(reader, None)
    finally:
        reader.close()  # closes the file
    if first is None or isinstance(first, ShardIssue):
        return "none" if first is None or first.kind == "empty_shard" else "damaged"
    latent = any(ext.startswith("moments") and ext.endswith(".safetensors") for ext in first[1])
    return "latent" if latent else "other"


def require_image_shards(source: str, shards: list[Shard], command: str) -> None:
    """Raises DataError, saying what `source` is, when none of its `shards` can hold images:
    each is a local latent shard (made by t2i-data encode) or a file that is no tar (a list
    of prompts, a manifest). `command` ("t2i-data inspect") reads image shards. Remote and
    empty shards pass: reading them reports what they hold. Reads one header and one sample
    per local shard, up to the first image shard."""
    latent = not_tar = None
    for shard in shards:
        if "://" in shard.url or is_empty_shard(shard):
            return
        if not is_tar_file(shard.url):
            not_tar = not_tar or shard.url
        elif is_latent_shard(Path(shard.url)):
            latent = latent or shard.url
        else:
            return
    if latent is not None:
        raise DataError(latent_shards_message(source, Path(latent).parent, command))
    if not_tar is not None:
        raise DataError(f"{not_tar!r} is not a tar shard (it does not start with a tar "
                        f"header): {command} reads image shards, .tar files of KEY.jpg + "
                        f"KEY.json (make them with t2i-data pack or t2i-data shapes)")


def latent_shards_message(source: str, folder: Path, command: str) -> str:
    """Why `command` refuses the latent shards of `source` (in `folder`), and where to look
    instead: the image shards they were encoded from and their manifest, when it is readable."""
    message = (f"{source!r} holds latent shards (made by t2i-data encode), not image shards: "
               f"{command} reads image shards")
    try:
        origin = read_manifest(folder).source
    except DataError:
        return message
    return (f"{message}; give it the image shards they were encoded from ({origin}); "
            f"{str(manifest_path(folder))!r} counts their samples and bad samples")
