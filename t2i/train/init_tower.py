"""`t2i-train --stage unet --init-from PARENT` with a frozen text tower: the child trains on the
text features its parent's UNet learnt, never on another tower's.

A parent that froze its tower stores it once, RUN/text.safetensors, and its checkpoints name it
by a `TowerReference` (source and sha256 of the tensors, t2i/models/frozen_text.py). A child
that freezes its tower too:

- given no text source (no --text-encoder, no --set text.model / text.pretrained /
  text.weights), adopts the parent's text section (`adopt_tower`), and stage 2 takes the
  parent's stored copy (`adopted_tower`, loaded sha256-checked): no download, no original file,
  so a 512 px child of a 256 px run also starts offline. The child then stores that tower as
  its own RUN/text.safetensors, with the parent's reference, as any frozen-tower run does.
- given a source, must have the parent's weights: the tensors' sha256 is compared, when the
  command starts (`check_same_weights`) and again when stage 2 builds the tower
  (`check_parent_tower`, for any caller of the trainer); a mismatch is one line naming both
  towers and the fix. The parent's own open_clip tag, and its original file once gone, are
  taken from the parent's stored copy instead of being fetched.

A parent that trained its tower and a child that freezes it (or the reverse) is refused where
the weights are copied (init_from.FROZEN_TOWER).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from t2i import rng
from t2i.config import Config, ConfigError, TextConfig, validate
from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference, reference_of
from t2i.models.io import WeightsError, read_metadata, require_config
from t2i.models.text import build_text_encoder

SOURCE_KEYS = ("model", "pretrained", "weights")  # text.* keys that name the tower's weights
FIX = ("leave out --text-encoder and --set text.model/text.pretrained/text.weights to train on "
       "the parent's tower, or start from a parent trained with this one")


@dataclass(frozen=True)
class ParentTower:
    """A --init-from parent's frozen text tower: its run's stored copy (`file`, which may be
    gone), the reference its checkpoint records (source and sha256) and the text section it
    was built with."""

    file: Path
    reference: TowerReference
    text: TextConfig


def parent_tower(cfg: Config) -> ParentTower | None:
    """The frozen tower of `cfg`'s stage-2 parent when `cfg` freezes its tower too and the
    parent froze its own (its checkpoint names a TowerReference); None otherwise: no stage-2
    parent, its checkpoint gone (initialize_from_parent says so), or a trained tower on either
    side (copy_parent refuses that pair). Raises WeightsError when the parent's model file
    cannot be read."""
    parent = cfg.init_from
    ckpt = Path(parent.checkpoint)
    if parent.stage != "unet" or not cfg.text.frozen or not ckpt.is_dir():
        return None
    model = ckpt / "model.safetensors"
    metadata = read_metadata(model)
    if METADATA_KEY not in metadata:
        return None
    return ParentTower(file=ckpt.parent.parent / TOWER_FILE,
                       reference=TowerReference.from_json(metadata[METADATA_KEY], model),
                       text=require_config(model, metadata).text)


def adopted_tower(cfg: Config) -> tuple[Path, TowerReference] | None:
    """(stored file, reference) of the parent's tower when the child takes it: its config names
    the parent's source (adopted, or given again) and the parent's copy exists. Stage 2 then
    loads that copy (load_tower checks its sha256) instead of building the tower from its
    source."""
    found = parent_tower(cfg)
    if found is None or not found.reference.same_source(cfg.text) or not found.file.is_file():
        return None
    return found.file, found.reference


def with_parent_tower(cfg: Config, explicit: Sequence[str]) -> Config:
    """`cfg` (whose init_from names a stage-2 parent) with its frozen tower settled: the
    parent's (`adopt_tower`) when `explicit`, the user's `key=value` overrides, name no text
    source; else `cfg` once its source holds the parent's weights (`check_same_weights`).
    Unchanged when the parent or the child trains its tower. Raises as those two do."""
    found = parent_tower(cfg)
    if found is None:
        return cfg
    keys = explicit_text_keys(explicit)
    if keys & set(SOURCE_KEYS):
        check_same_weights(cfg, found)
        return cfg
    return adopt_tower(cfg, found, keys)


def adopt_tower(cfg: Config, tower: ParentTower, keys: set[str]) -> Config:
    """`cfg` with the parent's text section (source and architecture; frozen). Raises
    WeightsError when the parent's stored copy is missing, ConfigError when an explicit
    text.KEY (in `keys`) disagrees with the parent's tower or its width is not the config's
    unet.context_dim."""
    if not tower.file.is_file():
        raise WeightsError(f"the parent's frozen text tower ({tower.reference.describe()}) is "
                           f"stored in {str(tower.file)!r}, which is missing: restore it, or "
                           f"pass a tower with the same weights (--text-encoder)")
    text = dataclasses.replace(tower.text, frozen=True)
    for name in sorted(keys - {"frozen"}):
        if getattr(cfg.text, name, None) != getattr(text, name, None):
            raise ConfigError(f"text.{name}={getattr(cfg.text, name)} (--set) disagrees with "
                              f"the parent's frozen text tower {tower.reference.describe()}, "
                              f"whose text.{name} is {getattr(text, name)}: a child trains on "
                              f"its parent's tower; drop the --set")
    try:
        return validate(dataclasses.replace(cfg, text=text))
    except ConfigError as err:
        raise ConfigError(f"--init-from {cfg.init_from.path} brings its frozen text tower "
                          f"{tower.reference.describe()} (text.width {text.width}): {err}"
                          ) from err


def check_same_weights(cfg: Config, tower: ParentTower) -> None:
    """The child's own text source (`cfg.text`) must hold the parent's tower: built here and
    its tensors' sha256 compared. Not built: the parent's own open_clip tag (the parent's copy
    is taken), a missing file (check_buildable names it, unless it is the parent's original,
    then the parent's copy is taken), no source at all (check_text_training refuses it).
    Raises WeightsError (`different_towers`), TextWeightsError when the source cannot be had."""
    text = cfg.text
    if text.pretrained and tower.reference.same_source(text):
        return  # an open_clip tag names published weights: the parent's copy of them is taken
    if not (text.pretrained or Path(text.weights).is_file()):
        return  # nothing to read here; refused or replaced by the parent's copy later
    with rng.seeded(cfg.train.seed, "init-text"):  # module init draws; weights loaded after
        own = reference_of(text, build_text_encoder(text))
    if own.sha256 != tower.reference.sha256:
        raise WeightsError(different_towers(tower, own))


def check_parent_tower(cfg: Config, reference: TowerReference) -> None:
    """Raises WeightsError (`different_towers`) when the frozen tower stage 2 is about to store
    in a --init-from child (`reference`) has other weights than the parent's."""
    found = parent_tower(cfg)
    if found is not None and found.reference.sha256 != reference.sha256:
        raise WeightsError(f"--init-from {cfg.init_from.path}: "
                           f"{different_towers(found, reference)}")


def different_towers(tower: ParentTower, own: TowerReference) -> str:
    """One line naming both towers (source, sha256, the parent's stored file) and the fix."""
    return (f"the parent's frozen text tower ({tower.reference.describe()}, sha256 "
            f"{tower.reference.sha256[:12]}..., stored as {str(tower.file)!r}) is not this "
            f"run's ({own.describe()}, sha256 {own.sha256[:12]}...): the parent's UNet learnt "
            f"its text features; {FIX}")


def explicit_text_keys(explicit: Sequence[str]) -> set[str]:
    """The text.KEY names that `key=value` overrides set."""
    keys = (item.split("=", 1)[0].strip() for item in explicit)
    return {key.split(".", 1)[1] for key in keys if key.startswith("text.")}
