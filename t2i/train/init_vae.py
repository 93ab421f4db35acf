"""`t2i-train --stage vae --init-from VAE`: fine-tune an existing VAE on new images.

What sd-vae-ft-mse did to the Stable Diffusion VAE (continue its training with the
reconstruction, LPIPS and PatchGAN terms on other photos), for any VAE that `--vae` accepts
(t2i/models/vae_files.py): a t2i `vae.safetensors`, a diffusers AutoencoderKL folder (or the
pipeline folder holding it in vae/), an original LDM / Stable Diffusion single file.

- The run's `vae` section takes the file's architecture (base_channels, channel_mult,
  z_channels, norm_groups, post_quant_conv, downsample_padding, attention_bias, ...) the way
  stage 2 adopts an imported VAE (`with_vae_architecture`); its own channels_last and training
  settings (vae.disc_*, vae.lpips_*) stay the run's. An architecture key set with --set that
  disagrees with the file is an error naming the key and both values.
- Weights and EMA start from the file's weights (a VAE file holds no EMA: EMA = the weights),
  its latent_scale buffer included; the optimizer, the discriminator and the step are fresh.
- The exported vae.safetensors keeps the file's latent scale instead of measuring a new one
  (vae_stage.export_vae): a UNet trained on the parent's scaled latents, and stage 2 later,
  see latents of the same scale.
- `vae.freeze_encoder=true` trains the decoder alone (vae_stage.build_vae): the encoder stays
  the file's, bitwise, so latents encoded with the file stay valid. It needs a VAE file parent
  (config.checks.check_vae_training); with_vae_file records the parent before validating.
- The parent is recorded in config.json's `init_from` (stage "vae", kind "vae_file",
  ema_sha256 "": no EMA file; checkpoint = the file or folder read) and checked when a start
  is resumed before its first checkpoint: a changed file is an error, as for a checkpoint
  parent.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import torch

from t2i.config import Config, ConfigError, VAEConfig, listed, override_key
from t2i.config.checks import check_independent_of_vae
from t2i.config.sections import InitFromConfig
from t2i.models.io import (WeightsError, clean_key, file_sha256, load_into, read_metadata,
                           require_config)
from t2i.models.vae_files import (brings_architecture, is_t2i_vae, open_vae, vae_weights_path,
                                  with_architecture, with_vae_architecture)
from t2i.models.vae_import import is_foreign, read_foreign, read_json, sources_sha256
from t2i.train.state import TrainState

log = logging.getLogger("t2i.train")

NOT_A_UNET_PARENT = ("--stage unet starts from a run folder or RUN/unet/ckpt-N, not from a file "
                     "or a diffusers folder: a VAE is no UNet parent; to train stage 2 on this "
                     "VAE, pass it with --vae")


def is_vae_file(path: Path) -> bool:
    """`--init-from path` names a VAE file, not a run or checkpoint folder: any file, or a
    diffusers AutoencoderKL folder (its config.json, or vae/config.json of a pipeline folder,
    names a `_class_name`; a run's config.json never does). Raises WeightsError for a folder
    config.json that is not readable JSON."""
    if path.is_file():
        return True
    return path.is_dir() and any((root / "config.json").is_file()
                                 and "_class_name" in read_json(root / "config.json")
                                 for root in (path, path / "vae"))


def fine_tunes_vae_file(cfg: Config) -> bool:
    """The run's stage 1 started from a VAE file (no EMA recorded), not a checkpoint."""
    return cfg.init_from.stage == "vae" and cfg.init_from.kind == "vae_file"


def vae_file_record(path: Path) -> tuple[VAEConfig, str, int]:
    """(architecture, identity, step) of the VAE at `path`: a t2i file's config metadata, its
    sha256 and its `step`; a foreign VAE's converted architecture, the identity of the files it
    is read from (`sources_sha256`: a diffusers folder's config.json and weights file, both of
    which define the VAE) and step 0. Raises WeightsError naming the file when it cannot be read
    or imported, or is a t2i file of another model than a VAE."""
    if is_foreign(path):
        foreign = read_foreign(path)
        return foreign.cfg, sources_sha256(foreign.files), 0
    file = vae_weights_path(path)
    metadata = read_metadata(file)
    stage = metadata.get("stage", "vae")
    if stage not in ("vae", "import"):
        raise WeightsError(f"{str(file)!r} holds a {stage} model, not a VAE")
    step = metadata.get("step", "0")
    return require_config(file, metadata).vae, file_sha256(file), int(step) if step.isdigit() else 0


def vae_identity(path: Path) -> str:
    """The identity `vae_file_record` records for the VAE at `path`."""
    if is_foreign(path):
        return sources_sha256(read_foreign(path).files)
    return file_sha256(vae_weights_path(path))


def with_vae_file(cfg: Config, path: str, explicit: Sequence[str] = ()) -> Config:
    """`cfg` fine-tuning the VAE at `path` (see the module docstring): its vae section adopting
    the file's architecture, `init_from` recording the file. `explicit` holds the `key=value`
    overrides the user gave (--set). Raises WeightsError for --stage unet and a file that cannot
    be read; ConfigError when an explicit vae key disagrees with the file, or the adopted
    config is not valid."""
    if cfg.train.stage != "vae":
        raise WeightsError(NOT_A_UNET_PARENT)  # the command names the path
    found = Path(path)
    arch, identity, step = vae_file_record(found)
    parent = InitFromConfig(stage="vae", path=str(path), checkpoint=str(found.resolve()),
                            step=step, sha256=identity, kind="vae_file")
    # recorded before the checks: vae.freeze_encoder needs a parent
    return adopt_file_architecture(dataclasses.replace(cfg, init_from=parent), arch, explicit,
                                   path, "--init-from")


def with_imported_vae(cfg: Config, path: str | None, explicit: Sequence[str] = (),
                      option: str = "--vae") -> Config:
    """`cfg` for stage 2 on the VAE at `path` (--vae, or an --init-from parent's): an imported
    VAE (`brings_architecture`: a diffusers folder, an LDM file, their conversion) brings its
    architecture now, before the config's cross-field checks (its factor decides the legal
    data.resolution), as the stage later does (vae_stage.with_vae_of); any other VAE, no VAE
    or --stage vae leaves `cfg` as it is. `explicit` holds the user's `key=value` overrides
    (--set): a vae architecture key that disagrees with the file is refused (check_explicit),
    as for stage 1's --init-from; `option` names where `path` came from in errors. Raises
    WeightsError when the file cannot be read, ConfigError naming `path` when an explicit key
    disagrees or the adopted config is not valid."""
    if path is None or cfg.train.stage == "vae":
        return cfg
    if not brings_architecture(path):
        check_run_vae_architecture(cfg, path, option)
        return cfg
    file = vae_weights_path(path) if not is_foreign(path) else None
    arch = (read_foreign(Path(path)).cfg if file is None
            else require_config(file, read_metadata(file)).vae)
    return adopt_file_architecture(cfg, arch, explicit, path, option)


def check_run_vae_architecture(cfg: Config, path: str, option: str) -> None:
    """A VAE trained by a t2i run (its config in the file's metadata) must have `cfg`'s VAE
    architecture: stage 2 builds its VAE from `cfg`. Raises ConfigError naming the file, the
    keys that differ and the run config to start from, before any other check of `cfg` (whose
    errors, e.g. on data.resolution and the VAE's factor, would not name the cause)."""
    if not is_t2i_vae(path):
        return  # not a t2i file: it is checked when loaded
    file = vae_weights_path(path)
    theirs = require_config(file, read_metadata(file))
    own = cfg.vae
    differ = [f"vae.{f.name} {getattr(theirs.vae, f.name)} (here {getattr(own, f.name)})"
              for f in dataclasses.fields(own)
              if getattr(with_architecture(own, theirs.vae), f.name) != getattr(own, f.name)]
    if differ:
        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        hint = (f"--config {folder / 'config.json'}" if (folder / "config.json").is_file()
                else f"--preset {theirs.preset} or the config of the run that trained it")
        presets = (f" (it was trained by a {theirs.preset} run, this is a {cfg.preset} run)"
                   if theirs.preset != cfg.preset else "")
        raise ConfigError(f"{option} {path} has another VAE architecture than this run's "
                          f"config{presets}: {listed(differ)}; start stage 2 from the "
                          f"settings it was trained with: {hint} --stage unet")


def adopt_file_architecture(cfg: Config, arch: VAEConfig, explicit: Sequence[str], path: str,
                            option: str) -> Config:
    """`cfg` adopting the architecture `arch` of the VAE file `path` (named by `option`):
    an explicit --set that disagrees is refused (check_explicit), the checks no architecture
    can change run first so their errors name a key, then those of the adopted config, whose
    errors name the file. Raises ConfigError."""
    check_explicit(cfg.vae, arch, explicit, path, option)
    check_independent_of_vae(cfg)
    try:
        return with_vae_architecture(cfg, arch)
    except ConfigError as err:
        raise ConfigError(f"{option} {path} brings its VAE architecture (downsampling factor "
                          f"{arch.downsample_factor}, z_channels {arch.z_channels}): {err}"
                          ) from err


def check_explicit(settings: VAEConfig, arch: VAEConfig, explicit: Sequence[str],
                   path: str, option: str = "--init-from") -> None:
    """Raises ConfigError naming the first `vae.KEY=value` of `explicit` whose key the file's
    architecture `arch` sets to another value (training settings are the run's: never);
    `option` (--init-from for stage 1, --vae for stage 2) is the one that named the file."""
    adopted = with_architecture(settings, arch)
    for item in explicit:
        section, _, name = override_key(item).partition(".")
        if section == "vae" and getattr(adopted, name, None) != getattr(settings, name, None):
            raise ConfigError(f"vae.{name}={getattr(settings, name)} (--set) disagrees with the "
                              f"VAE at {path!r}, whose vae.{name} is {getattr(arch, name)}: "
                              f"{option} a VAE file brings its architecture; drop the --set")


def initialize_from_vae_file(state: TrainState, parent: InitFromConfig) -> TrainState:
    """`state` with the weights of the VAE file `parent` records copied into its model and its
    EMA (in place: the module's parameters and buffers, latent_scale included, and the EMA
    tensors). Raises WeightsError when the file is gone, changed since it was recorded, cannot
    be read, or does not fit the model (tensors named)."""
    path = Path(parent.checkpoint)
    if not path.exists():
        raise WeightsError(f"the VAE {parent.checkpoint!r} this run fine-tunes (init_from in "
                           f"the run's config) no longer exists")
    if vae_identity(path) != parent.sha256:
        raise WeightsError(f"the VAE {parent.checkpoint!r} changed since this run recorded it "
                           f"(init_from.sha256): restore it or start a new run")
    weights = open_vae(path).state_dict()
    load_into(state.model, weights, path)
    with torch.no_grad():
        for name, ema in state.ema.items():
            ema.copy_(weights[clean_key(name)])
    log.info("vae: weights and EMA from %s (latent_scale %.6g, kept); fresh optimizer and "
             "discriminator, step 0", path, float(weights["latent_scale"]))
    return state
