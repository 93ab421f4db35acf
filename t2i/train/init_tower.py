"""`t2i-train --stage unet --init-from PARENT`: the child's text tower is its parent's, so the
child trains on the text features its parent's UNet learnt, never on another tower's.

Given no text option (no --text-encoder, --text-frozen, --text-trainable, --set text.*), the
child's `text` section is the parent's, `frozen` included, whatever its preset says
(`adopt_text`): a `tiny` child of a frozen-tower parent freezes its tower, a `small` child of a
parent that trained its tower trains it on (its weights copied from the checkpoint,
init_from.copy_parent). A text option that sets no source (e.g. --set text.heads=N) must agree
with the parent's section; --text-frozen / --text-trainable against the parent's choice is
refused in one line saying which way (`other_way`): a frozen tower has no tensors in the
parent's checkpoints to train on, and a trained one is stored nowhere else.

A parent that froze its tower stores it once, RUN/text.safetensors, and its checkpoints name it
by a `TowerReference` (source and sha256 of the tensors, t2i/models/frozen_text.py). A child
freezing its tower too:

- given no text source (no --text-encoder, no --set text.model / text.pretrained /
  text.weights), takes the parent's stored copy at stage 2 (`adopted_tower`, loaded
  sha256-checked): no download, no original file, so a 512 px child of a 256 px run also
  starts offline. The child then stores that tower as its own RUN/text.safetensors, with the
  parent's reference, as any frozen-tower run does.
- given a source (text.frozen then the parent's unless given), must have the parent's
  weights: the tensors' sha256 is compared, when the command starts (`check_same_weights`)
  and again when stage 2 builds the tower (`check_parent_tower`, for any caller of the
  trainer); a mismatch is one line naming both towers and the fix. The parent's own open_clip
  tag, and its original file once gone, are taken from the parent's stored copy instead of
  being fetched.

A config given to the trainer directly with the other text.frozen than its parent's is refused
where the weights are copied (init_from.copy_parent, with `frozen_tower_fix`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from t2i import rng
from t2i.config import Config, ConfigError, TextConfig, override_key
from t2i.models.frozen_text import METADATA_KEY, TOWER_FILE, TowerReference, reference_of
from t2i.models.io import WeightsError, read_metadata, require_config
from t2i.models.checkpoints import latest_checkpoint
from t2i.models.text import build_text_encoder
from t2i.train.run import Run

SOURCE_KEYS = ("model", "pretrained", "weights")  # text.* keys that name the tower's weights
FIX = ("leave out --text-encoder and --set text.model/text.pretrained/text.weights to train on "
       "the parent's tower, or start from a parent trained with this one")


@dataclass(frozen=True)
class ParentTower:
    """A --init-from parent's frozen text tower: its run's stored copy (`file`, which may be
    gone) and the reference its checkpoint records (source and sha256)."""

    file: Path
    reference: TowerReference


@dataclass(frozen=True)
class ParentText:
    """A stage-2 parent's text section as its model file records it (`text.frozen`: whether it
    froze its tower), and its frozen tower when its checkpoint names one."""

    model: Path  # the parent checkpoint's model.safetensors
    text: TextConfig
    tower: ParentTower | None


def parent_text(cfg: Config) -> ParentText | None:
    """The text section of `cfg`'s stage-2 parent; None when there is none (no stage-2 parent,
    or its checkpoint gone: initialize_from_parent says so). Raises WeightsError when the
    parent's model file cannot be read or carries no valid config."""
    parent = cfg.init_from
    ckpt = Path(parent.checkpoint)
    if parent.stage != "unet" or not ckpt.is_dir():
        return None
    model = ckpt / "model.safetensors"
    metadata = read_metadata(model)
    text = require_config(model, metadata).text
    tower = None if METADATA_KEY not in metadata else ParentTower(
        file=ckpt.parent.parent / TOWER_FILE,
        reference=TowerReference.from_json(metadata[METADATA_KEY], model))
    return ParentText(model=model, text=text, tower=tower)


def parent_tower(cfg: Config) -> ParentTower | None:
    """The frozen tower of `cfg`'s stage-2 parent when `cfg` freezes its tower too and the
    parent froze its own (its checkpoint names a TowerReference); None otherwise (see
    parent_text; a trained tower on either side: copy_parent refuses that pair). Raises
    WeightsError when the parent's model file cannot be read."""
    found = parent_text(cfg) if cfg.text.frozen else None
    return None if found is None else found.tower


def adopted_tower(cfg: Config) -> tuple[Path, TowerReference] | None:
    """(stored file, reference) of the parent's tower when the child takes it: its config names
    the parent's source (adopted, or given again) and the parent's copy exists. Stage 2 then
    loads that copy (load_tower checks its sha256) instead of building the tower from its
    source."""
    found = parent_tower(cfg)
    if found is None or not found.reference.same_source(cfg.text) or not found.file.is_file():
        return None
    return found.file, found.reference


def tower_stored(cfg: Config, run: Run) -> bool:
    """The text tower's weights are had without its source (open_clip tag or text.weights
    file), so the source need not exist: a frozen tower from the run's own copy
    (RUN/text.safetensors, a resume) or its --init-from parent's (`adopted_tower`); a trained
    tower from the run's stage-2 checkpoint (a resume) or its stage-2 parent's checkpoint
    (init_from.copy_parent copies text.*). Stage 2 then builds the trained tower's
    architecture alone (unet_stage.train_diffusion)."""
    if cfg.text.frozen:
        return (run.dir / TOWER_FILE).is_file() or adopted_tower(cfg) is not None
    return cfg.init_from.stage == "unet" or latest_checkpoint(run.stage_dir("unet")) is not None


def with_parent_tower(cfg: Config, explicit: Sequence[str]) -> Config:
    """`cfg` (whose init_from names a stage-2 parent) with its text tower settled from the
    parent's: the parent's whole text section (`adopt_text`) when `explicit`, the user's
    `key=value` overrides (options included), name no text source; else `cfg` with the
    parent's text.frozen unless given, a frozen tower once its source holds the parent's
    weights (`check_same_weights`). Raises ConfigError when an explicit text.frozen is not the
    parent's (`other_way`), and as adopt_text and check_same_weights."""
    found = parent_text(cfg)
    if found is None:
        return cfg
    keys = explicit_text_keys(explicit)
    if "frozen" in keys and cfg.text.frozen != found.text.frozen:
        raise ConfigError(other_way(cfg, found))
    if not keys & set(SOURCE_KEYS):
        return adopt_text(cfg, found, keys, "unet.context_dim" in explicit_keys(explicit))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, frozen=found.text.frozen))
    if found.tower is not None:
        check_same_weights(cfg, found.tower)
    return cfg


def adopt_text(cfg: Config, parent: ParentText, keys: set[str], context_dim_given: bool
               ) -> Config:
    """`cfg` with the parent's text section (source, architecture, frozen) and, unless
    `context_dim_given` (an explicit --set, which must equal it), unet.context_dim = its
    text.width (the UNet cross-attends to the text states; as --text-encoder sets it). Raises
    WeightsError when the parent froze its tower and its stored copy is missing, ConfigError
    when an explicit text.KEY (in `keys`) disagrees with the parent's section or an explicit
    unet.context_dim with its width."""
    tower, text = parent.tower, parent.text
    if tower is not None and not tower.file.is_file():
        raise WeightsError(f"the parent's frozen text tower ({tower.reference.describe()}) is "
                           f"stored in {str(tower.file)!r}, which is missing: restore it, or "
                           f"pass a tower with the same weights (--text-encoder)")
    what = (f"frozen text tower {tower.reference.describe()}" if tower is not None
            else f"text tower (trained, in {str(parent.model)!r})")
    for name in sorted(keys - {"frozen"}):
        if getattr(cfg.text, name, None) != getattr(text, name, None):
            raise ConfigError(f"text.{name}={getattr(cfg.text, name)} (--set) disagrees with "
                              f"the parent's {what}, whose text.{name} is "
                              f"{getattr(text, name)}: a child trains on its parent's tower; "
                              f"drop the --set")
    if context_dim_given and cfg.unet.context_dim != text.width:
        raise ConfigError(f"--init-from {cfg.init_from.path} brings its {what} (text.width "
                          f"{text.width}): unet.context_dim={cfg.unet.context_dim} (--set) must "
                          f"equal it, the UNet attends to the text states; drop the --set")
    # the rest of the config is validated by the caller (t2i-train: once a VAE file is read)
    return dataclasses.replace(cfg, text=text,
                               unet=dataclasses.replace(cfg.unet, context_dim=text.width))


def other_way(cfg: Config, parent: ParentText) -> str:
    """One line: the child explicitly sets the other text.frozen than its parent's; which way,
    the options that set it, and the fix (drop them: the child then takes the parent's)."""
    head = f"--init-from {cfg.init_from.path}: "
    if parent.text.frozen:
        stored = parent.tower.file if parent.tower is not None else parent.model.parent.parent
        return (head + f"the parent froze its text tower ({str(stored)}) and this run trains "
                f"it (text.frozen=false: --text-trainable, --text-encoder scratch or --set "
                f"text.frozen=false), but the parent's checkpoints hold no text weights to "
                f"train on; drop that option (the child then takes the parent's frozen tower), "
                f"or start from a parent that trained its tower")
    return (head + f"the parent trained its text tower (text.* in {str(parent.model)!r}) and "
            f"this run freezes it (text.frozen=true: --text-frozen or --set text.frozen=true); "
            f"drop that option (the child then trains the parent's tower on), or start from a "
            f"parent that froze its tower")


def frozen_tower_fix(child_trains: bool, ckpt: Path) -> str:
    """For copy_parent: which way the text towers differ (the child trains its tower and the
    parent checkpoint `ckpt` froze its own, or the reverse) and the fix."""
    if child_trains:
        return (f"the parent froze its text tower ({ckpt.parent.parent / TOWER_FILE}) and this "
                f"run trains it: set text.frozen as the parent had it (drop --text-trainable / "
                f"--set text.frozen=false: with no text option a child takes its parent's text "
                f"section)")
    return ("the parent trained its text tower (text.* in its checkpoints) and this run freezes "
            "it: set text.frozen as the parent had it (drop --text-frozen / --set "
            "text.frozen=true: with no text option a child takes its parent's text section)")


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


def explicit_keys(explicit: Sequence[str]) -> set[str]:
    """The config keys (`section.name`) that `key=value` overrides set."""
    return {override_key(item) for item in explicit}


def explicit_text_keys(explicit: Sequence[str]) -> set[str]:
    """The text.KEY names that `key=value` overrides set."""
    return {key.split(".", 1)[1] for key in explicit_keys(explicit) if key.startswith("text.")}
