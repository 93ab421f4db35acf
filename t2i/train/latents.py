"""`--cache-latents`: the frozen VAE encodes each training image once; later visits read the
posterior moments from a cache.

The cache maps a sample's key (the shard's full location, its path or URL, + the sample key;
or the shapes set's global batch row) to the posterior's mean and logvar (fp32, not a sample),
so the step still draws a fresh latent mean + exp(logvar / 2) * eps from its own generator and
a cached run trains exactly like an uncached one. It is written as
`RUN/latents/<id>-rank<r>.safetensors` (by t2i.models.io: temporary name, then rename) at every
checkpoint, where <id> hashes the VAE's identity, the data identity (source, subset,
resolution, crop, flip, loader seed, global batch), the encoder's precision and the key
scheme: another VAE, other data or another precision gets another file, never stale latents. The key holds the shard's full location, not its
file name, because folders packed separately repeat both file names and keys (`--data
dirA,dirB`: each holds data_000000.tar with keys 000000000...); a file-name key gave the second
folder's images the first folder's latents. A damaged cache file is set aside (`discarded`
says why) and rebuilt from the data.

Limits: the cache lives in memory (fp32: 2 x C x h x w x 4 bytes per image, 128 KB at 512 px
with an f8 VAE) and suits sets up to some hundred thousand images; a random crop or flip is
frozen at the first visit (later epochs reuse that view); images are still read and decoded
(the saving is the VAE encoder). The shapes set draws new images forever, so there the cache
pays off only when a run is resumed or repeated with the same seed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from t2i.config import DataConfig
from t2i.models.io import WeightsError, load_weights, save_weights
from t2i.models.vae_files import vae_sha256

Moments = tuple[torch.Tensor, torch.Tensor]  # mean, logvar: (B, C, h, w) each


def cache_identity(vae_path: Path, data: DataConfig, loader_seed: int, global_batch: int,
                   precision: str) -> dict:
    """What the cached moments depend on: the VAE weights (vae_sha256: an imported VAE's
    source files), how images are made, and the precision the encoder runs at (the step's
    autocast: "fp32", "bf16" or "fp16")."""
    return {"vae_sha256": vae_sha256(vae_path), "source": data.source, "subset": data.subset,
            "resolution": data.resolution, "crop": data.crop, "hflip": data.hflip,
            "seed": loader_seed, "global_batch": global_batch, "keys": KEY_SCHEME,
            "precision": precision}


KEY_SCHEME = "shard-location/key"  # caches keyed by shard file name (unnamed) are not reused


def sample_keys(batch: dict) -> list[str]:
    """Keys unique across the data set: the shard's location (path or URL, as the loader's
    batch["shard"] gives it) + the sample key where the batch names shards."""
    if "shard" in batch:
        return [f"{shard}/{key}" for shard, key in zip(batch["shard"], batch["key"])]
    return list(batch["key"])


class LatentCache:
    """key -> (mean, logvar) of the frozen VAE's posterior, in memory, persisted on `save`."""

    def __init__(self, folder: Path, identity: dict, rank: int = 0):
        name = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = folder / f"{name}-rank{rank}.safetensors"
        self.identity = identity
        self.entries: dict[str, Moments] = {}
        self.hits = self.misses = 0
        self._saved = 0
        self.discarded: str | None = None  # why an existing cache file was not used
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        """Read the cache file; a damaged one (or one of another identity) is set aside and
        rebuilt, since every entry can be recomputed from the data."""
        try:
            tensors, meta = load_weights(self.path)
            if json.loads(meta.get("identity", "{}")) != self.identity:
                raise ValueError("it was made for other weights or data")
            keys = json.loads(meta["keys"])
            entries = {key: (tensors["mean"][i], tensors["logvar"][i])
                       for i, key in enumerate(keys)}
        except (WeightsError, ValueError, KeyError, IndexError) as err:
            self.discarded = f"{self.path}: {err}"
            return
        self.entries = entries
        self._saved = len(self.entries)

    def moments(self, keys: list[str], images: torch.Tensor,
                encode: Callable[[torch.Tensor], Moments]) -> Moments:
        """(mean, logvar) for the rows of `images`, encoding only the keys not cached yet."""
        missing = [i for i, key in enumerate(keys) if key not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        if missing:
            rows = images if len(missing) == len(keys) else images[missing]
            mean, logvar = encode(rows)  # (m, C, h, w) each
            for j, i in enumerate(missing):
                self.entries[keys[i]] = (mean[j].float().cpu(), logvar[j].float().cpu())
        mean = torch.stack([self.entries[k][0] for k in keys])  # (B, C, h, w)
        logvar = torch.stack([self.entries[k][1] for k in keys])
        return mean.to(images.device), logvar.to(images.device)

    def save(self) -> None:
        """Write all entries (temporary file, then rename); a no-op when nothing is new. Raises
        WeightsError when the write fails (e.g. disk full)."""
        if len(self.entries) == self._saved:
            return
        keys = list(self.entries)
        tensors = {"mean": torch.stack([self.entries[k][0] for k in keys]),
                   "logvar": torch.stack([self.entries[k][1] for k in keys])}
        save_weights(self.path, tensors, {"identity": json.dumps(self.identity),
                                          "keys": json.dumps(keys)})
        self._saved = len(keys)

    def stats(self) -> dict:
        return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses}
