"""Explicit randomness: seeds derived from (seed, *keys), fold_in style, and generators.

Nothing in t2i draws from torch's global generator in a hot path. Per-step, per-rank and
per-purpose randomness is derived from the run seed with `derive_seed(seed, step, rank, ...)`
so that a resumed run or another rank reproduces exactly the numbers it would have drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

_MASK64 = (1 << 63) - 1  # torch.Generator seeds must fit a signed 64-bit integer


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed from a root seed and any number of keys (like jax.random.fold_in)."""
    material = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "little") & _MASK64


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh torch.Generator on `device` seeded with derive_seed(seed, *keys)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


@contextlib.contextmanager
def seeded(seed: int, *keys: int | str) -> Iterator[None]:
    """Run a block (e.g. module construction, whose init draws from torch's global generator)
    with the global CPU generator seeded from (seed, *keys), restoring it afterwards. The one
    place t2i calls torch.manual_seed; nothing leaves the global generators changed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield
