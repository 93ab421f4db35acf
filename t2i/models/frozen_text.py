"""A frozen text tower stored once per run, as `RUN/text.safetensors`, instead of in every
checkpoint and EMA file.

A frozen tower never changes, so a stage-2 checkpoint holds the UNet only and names its tower
by a `TowerReference`: where the weights came from (open_clip model and tag, or a file) and the
sha256 of the weights. The run keeps one copy (written atomically when stage 2 starts), so
sampling and evaluation need neither the network nor the original file; loading it checks its
sha256 against the checkpoint's reference, so a replaced or changed file is an error, never
silently other text features. `small`: 63M text parameters, 254 MB less in each of the model
and EMA files of every checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from t2i.config import TextConfig
from t2i.models.io import (WeightsError, clean_state_dict, load_into, load_weights, save_weights,
                           tensors_digest)
from t2i.models.text import TextEncoder, build_text_encoder

TOWER_FILE = "text.safetensors"  # in the run folder, beside vae.safetensors
METADATA_KEY = "text_tower"  # checkpoint and tower-file metadata: a TowerReference as JSON


@dataclass(frozen=True)
class TowerReference:
    """Which frozen text weights a run was trained with: the config's `model`, `pretrained`
    (open_clip tag) and `weights` (file) as given, and `sha256`, the digest of the tensors
    (names, dtypes, shapes, bytes; `weights_sha256`)."""

    model: str
    pretrained: str
    weights: str
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str, source: str | Path) -> "TowerReference":
        """Parse the metadata entry read from `source`. Raises WeightsError naming it."""
        try:
            return TowerReference(**json.loads(text))
        except (ValueError, TypeError) as err:
            raise WeightsError(f"weights file {str(source)!r}: its `{METADATA_KEY}` metadata is "
                               f"not a text tower reference ({err})") from err

    def describe(self) -> str:
        if self.pretrained:
            return f"open_clip {self.model}:{self.pretrained}"
        return f"{self.weights}" if self.weights else f"{self.model} (random)"

    def same_source(self, cfg: TextConfig) -> bool:
        return (self.model, self.pretrained, self.weights) == (cfg.model, cfg.pretrained,
                                                               cfg.weights)


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's tensors (clean names), independent of any file's metadata."""
    return tensors_digest(clean_state_dict(state), {})


def reference_of(cfg: TextConfig, encoder: TextEncoder) -> TowerReference:
    return TowerReference(cfg.model, cfg.pretrained, cfg.weights,
                          weights_sha256(encoder.state_dict()))


def save_tower(path: Path, encoder: TextEncoder, reference: TowerReference) -> Path:
    """Write the tower's weights with its reference in the metadata, atomically. Raises
    WeightsError when the write fails (disk full: with the space needed)."""
    return save_weights(path, encoder.state_dict(), {METADATA_KEY: reference.to_json()})


def load_tower(path: Path, cfg: TextConfig, reference: TowerReference,
               device: torch.device | str = "cpu") -> TextEncoder:
    """The frozen tower stored at `path`, built for `cfg` (architecture only: no download, no
    original file) and loaded from it. Raises WeightsError naming the file when it is missing
    or damaged, or when its weights are not the ones `reference` names (sha256 mismatch)."""
    if not path.is_file():
        raise WeightsError(f"text tower file {str(path)!r} is missing: this run's checkpoints "
                           f"hold no text weights (its frozen tower, {reference.describe()}, is "
                           f"stored once per run there); copy it back from the run's original "
                           f"folder")
    tensors, _ = load_weights(path)
    found = weights_sha256(tensors)
    if found != reference.sha256:
        raise WeightsError(f"text tower file {str(path)!r} does not hold the weights this run "
                           f"was trained with ({reference.describe()}): sha256 {found[:12]}..., "
                           f"the checkpoint records {reference.sha256[:12]}...; restore the "
                           f"run's own copy")
    encoder = build_text_encoder(cfg, device=device, load_weights=False)
    load_into(encoder, tensors, path)
    return encoder.requires_grad_(False)


def read_reference(path: Path) -> TowerReference:
    """The reference a tower file was written with. Raises WeightsError when it has none."""
    from t2i.models.io import read_metadata

    metadata = read_metadata(path)
    if METADATA_KEY not in metadata:
        raise WeightsError(f"weights file {str(path)!r} has no `{METADATA_KEY}` metadata: it "
                           f"was not written by t2i-train")
    return TowerReference.from_json(metadata[METADATA_KEY], path)


def run_tower(run_dir: Path, cfg: TextConfig,
              stored: tuple[Path, TowerReference] | None = None
              ) -> tuple[TextEncoder, TowerReference, bool]:
    """The frozen tower a stage-2 run trains with, its reference, and whether it still has to
    be written to `run_dir / TOWER_FILE`: the run's own copy when it has one (a resume: no
    network, no original file), else the copy `stored` names (file, reference: a --init-from
    parent's, t2i/train/init_tower.py), else built from `cfg` (open_clip tag or file). Raises
    WeightsError when a copy is damaged or not the weights its reference names, or the run's
    came from another source than `cfg` names, TextWeightsError when the source cannot be
    had."""
    path = run_dir / TOWER_FILE
    if not path.is_file() and stored is not None:
        return load_tower(stored[0], cfg, stored[1]), stored[1], True
    if not path.is_file():
        encoder = build_text_encoder(cfg)
        return encoder.requires_grad_(False), reference_of(cfg, encoder), True
    reference = read_reference(path)
    if not reference.same_source(cfg):
        raise WeightsError(f"{str(path)!r} holds the text tower {reference.describe()}, but the "
                           f"config names text.model={cfg.model!r} text.pretrained="
                           f"{cfg.pretrained!r} text.weights={cfg.weights!r}: a run keeps its "
                           f"tower; use a new --out for another one")
    return load_tower(path, cfg, reference), reference, False
