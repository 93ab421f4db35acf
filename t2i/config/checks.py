"""Validation of combinations: what the models and the optimizer need of several fields together
(each field alone is checked when its section is built, see `rules.py`). `validate` runs them all
whenever a config is resolved, overridden or read back; the UNet and the text tower call the same
checks when built from a config directly."""

from __future__ import annotations

import math

from t2i.config.rules import ConfigError
from t2i.config.sections import (Config, DataConfig, ScheduleConfig, TextConfig, TrainConfig,
                                 UNetConfig, VAEConfig)

CLIP_VOCAB_SIZE = 49408  # open_clip's BPE tokenizer emits ids below this (custom towers)


def check_unet(cfg: UNetConfig) -> None:
    """What the UNet constructor needs: one attention flag per level, heads that divide every
    attended width (the middle block always attends), widths that split into 2-D position
    features, and a timestep embedding with frequencies left after the shift."""
    if len(cfg.attention_levels) != len(cfg.channel_mult):
        raise ConfigError(f"unet.attention_levels has {len(cfg.attention_levels)} entries but "
                          f"unet.channel_mult has {len(cfg.channel_mult)}")
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    attended = [w for w, a in zip(widths, cfg.attention_levels) if a] + [widths[-1]]
    if any(w % cfg.num_heads for w in attended):
        raise ConfigError(f"unet.num_heads={cfg.num_heads} must divide the width of every "
                          f"attention level (widths {widths})")
    if cfg.attention_positions and any(w % 4 for w in attended):
        raise ConfigError(f"unet.attention_positions needs every attention level's width "
                          f"divisible by 4 (widths {widths})")
    if cfg.freq_shift >= cfg.base_channels // 2:
        raise ConfigError(f"unet.freq_shift must be below unet.base_channels // 2 = "
                          f"{cfg.base_channels // 2}, got {cfg.freq_shift}")


def check_norm_groups(section: str, cfg: UNetConfig | VAEConfig) -> None:
    """GroupNorm needs `norm_groups` to divide the channels it normalises. Every GroupNorm of the
    UNet and the VAE normalises a level width (base_channels x channel_mult) or a sum of two (a
    UNet skip concatenation), never z_channels or the image channels, so dividing every level
    width is exactly what the models need. (`layers.group_norm` still falls back to gcd(groups,
    channels) for modules built directly, outside a validated config, e.g. in unit tests.)"""
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    if any(w % cfg.norm_groups for w in widths):
        raise ConfigError(f"{section}.norm_groups={cfg.norm_groups} must divide every channel "
                          f"width of the {section.upper()} (widths {widths}); pick a divisor "
                          f"of {math.gcd(*widths)}")


def check_schedule(cfg: ScheduleConfig) -> None:
    """Linear and scaled-linear betas must not decrease (noise grows with t)."""
    if cfg.beta_schedule in ("linear", "scaled_linear") and cfg.beta_end < cfg.beta_start:
        raise ConfigError(f"schedule.beta_end={cfg.beta_end} is below schedule.beta_start="
                          f"{cfg.beta_start}: {cfg.beta_schedule} betas must grow with t; "
                          f"swap them")


def check_text(cfg: TextConfig) -> None:
    """What the text tower needs; a named open_clip model is checked when it is built."""
    if cfg.weights and cfg.pretrained:
        raise ConfigError("set either text.weights (a local file) or text.pretrained "
                          "(an open_clip tag), not both")
    if cfg.model != "custom":
        return
    if cfg.pretrained:
        raise ConfigError("text.pretrained needs a named text.model (e.g. ViT-L-14); "
                          "for a custom tower pass a local file with text.weights=PATH")
    if cfg.width % cfg.heads:
        raise ConfigError(f"text.heads={cfg.heads} must divide text.width={cfg.width}")
    if cfg.vocab_size < CLIP_VOCAB_SIZE:
        raise ConfigError(f"text.vocab_size must be at least {CLIP_VOCAB_SIZE} (the tokenizer's "
                          f"ids), got {cfg.vocab_size}")


def check_text_training(cfg: TextConfig) -> None:
    """Stage 2 needs text states that mean something: a frozen tower must get its weights from
    a tag or a file (a frozen random one would condition the UNet on fixed noise features for
    the whole run). Not part of `validate`: such a config may still build models (benchmarks),
    train the VAE alone, or load an old run."""
    if cfg.frozen and not (cfg.pretrained or cfg.weights):
        raise ConfigError(
            "the text tower is frozen but has random weights (text.frozen=true, no "
            "text.pretrained or text.weights): pass --text-encoder ViT-B-32:laion2b_s34b_b79k "
            "(or another open_clip MODEL:TAG), --text-encoder PATH (a local open_clip weights "
            "file), or --text-encoder scratch (a trainable tower from scratch)")


def check_data(cfg: DataConfig) -> None:
    if not cfg.source.strip():
        raise ConfigError("data.source must not be empty (shapes, a shard folder or hf://...)")


def check_train(cfg: TrainConfig) -> None:
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by "
                          f"train.grad_accum {cfg.grad_accum}")
    if len(cfg.vae_betas) != 2:
        raise ConfigError(f"train.vae_betas must be two numbers (beta1, beta2), got "
                          f"{cfg.vae_betas}")
    if 0 < cfg.snr_gamma < cfg.snr_floor:
        raise ConfigError(f"train.snr_floor {cfg.snr_floor} is above train.snr_gamma "
                          f"{cfg.snr_gamma}: the clamp would be empty")


def check_validation(cfg: Config) -> None:
    """The validation set is well defined: one way to hold shards out, a timestep grid that
    fits the schedule, and held-out data for a validation loss of a shard source (the shapes
    set draws its own, see t2i/validation.py)."""
    data, train = cfg.data, cfg.train
    if data.val_source.strip() and data.val_fraction > 0:
        raise ConfigError("set either data.val_source (held-out shards) or data.val_fraction "
                          "(a share of data.source's shards), not both")
    if train.val_timesteps > cfg.schedule.num_train_timesteps:
        raise ConfigError(f"train.val_timesteps {train.val_timesteps} is above "
                          f"schedule.num_train_timesteps {cfg.schedule.num_train_timesteps}")
    if (train.val_every and data.source != "shapes" and not data.val_source.strip()
            and data.val_fraction == 0):
        raise ConfigError("train.val_every needs held-out data: set data.val_source (a folder of "
                          "held-out shards) or data.val_fraction (e.g. 0.02 of data.source's "
                          "shards, never trained on)")


def check_vae_training(cfg: Config) -> None:
    """Stage 1's adversarial and perceptual terms (t2i/train/gan.py): the PatchGAN must leave
    at least one logit per image, LPIPS needs its local weights file and 16-pixel images (its
    deepest features are at 1/16 resolution), a frozen encoder needs a VAE file to start from. Whether the file exists is checked when stage 1
    starts, not here: a VAE file read on another machine carries the same config."""
    vae, res = cfg.vae, cfg.data.resolution
    if vae.disc_weight > 0 and res // 2 ** vae.disc_layers < 3:
        raise ConfigError(f"vae.disc_layers={vae.disc_layers} leaves no discriminator logit at "
                          f"data.resolution {res} (needs resolution >= 3 x 2**disc_layers = "
                          f"{3 * 2 ** vae.disc_layers}); lower vae.disc_layers")
    if vae.lpips_weight > 0 and not vae.lpips_weights.strip():
        raise ConfigError(f"vae.lpips_weight={vae.lpips_weight} needs vae.lpips_weights=PATH, a "
                          "local LPIPS-VGG16 file t2i never downloads: make it offline with "
                          "t2i.models.lpips.convert_lpips_weights (docs/vae.md, 'LPIPS weights "
                          "file'), or set vae.lpips_weight=0")
    if vae.lpips_weight > 0 and res < 16:
        raise ConfigError(f"vae.lpips_weight needs data.resolution >= 16, got {res}")
    parent = cfg.init_from
    if (vae.freeze_encoder and cfg.train.stage != "unet"
            and (parent.stage, parent.kind) != ("vae", "vae_file")):
        given = (f"--init-from {parent.path} is a checkpoint, not a VAE file: give the "
                 f"vae.safetensors its run exported" if parent.stage else
                 "give that VAE with --init-from FILE (a run's vae.safetensors, a diffusers "
                 "AutoencoderKL folder, an LDM file) and --stage vae")
        raise ConfigError(f"vae.freeze_encoder=true trains the decoder of an existing VAE: "
                          f"{given}")


def image_multiple(cfg: Config) -> int:
    """Image sides must be multiples of this: the VAE's factor times the UNet's downsampling."""
    return cfg.vae.downsample_factor * 2 ** (len(cfg.unet.channel_mult) - 1)


def check_wiring(cfg: Config) -> None:
    """The parts fit together: latents, text states and image sizes."""
    for name in ("in_channels", "out_channels"):
        if getattr(cfg.unet, name) != cfg.vae.z_channels:
            raise ConfigError(f"unet.{name}={getattr(cfg.unet, name)} must equal "
                              f"vae.z_channels={cfg.vae.z_channels}: the UNet denoises latents")
    if cfg.unet.context_dim != cfg.text.width:
        raise ConfigError(f"unet.context_dim={cfg.unet.context_dim} must equal "
                          f"text.width={cfg.text.width}: the UNet attends to the text states")
    multiple = image_multiple(cfg)
    if cfg.data.resolution % multiple:
        raise ConfigError(f"data.resolution {cfg.data.resolution} must be a multiple of "
                          f"{multiple} (VAE factor {cfg.vae.downsample_factor} x UNet "
                          f"downsampling {multiple // cfg.vae.downsample_factor})")


def check_independent_of_vae(cfg: Config) -> None:
    """The checks no VAE architecture can change: run before a VAE file's architecture is
    adopted (--vae, --init-from FILE), so their errors name the key, not the file."""
    check_unet(cfg.unet)
    check_norm_groups("unet", cfg.unet)
    check_schedule(cfg.schedule)
    check_text(cfg.text)
    check_data(cfg.data)
    check_train(cfg.train)
    check_vae_training(cfg)
    check_validation(cfg)


def validate(cfg: Config) -> Config:
    """`cfg` if every value is legal, else a ConfigError naming the first bad key."""
    check_independent_of_vae(cfg)
    check_norm_groups("vae", cfg.vae)  # these two depend on the VAE's architecture
    check_wiring(cfg)
    return cfg
