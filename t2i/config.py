"""Frozen configuration tree for every part of t2i, presets, and file / override loading.

Every part of the system is configured by a frozen dataclass below. A whole run is one `Config`.
Presets are small factory functions in a registry (`PRESETS`); no other module hard-codes model
sizes. Configs load from JSON or TOML, take `a.b=value` overrides, reject unknown keys and wrong
types with an error naming the key, and round-trip to JSON exactly.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration value, key, file or preset is invalid; the message names it."""


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleConfig:
    """Training noise schedule (DDPM betas) and what the network predicts."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2
    prediction_type: str = "epsilon"  # epsilon | v_prediction
    snr_scale: float = 1.0  # multiply SNR(t) at every t (< 1: noisier), see scale_snr

    def __post_init__(self) -> None:
        if not self.snr_scale > 0:
            raise ConfigError(f"schedule.snr_scale must be positive, got {self.snr_scale}")


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder (stage 1). The downsampling factor is 2 ** (len(channel_mult) - 1)."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    norm_groups: int = 32
    mid_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """Latent denoiser (stage 2) with time embedding and cross-attention to text states."""

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = 8
    transformer_depth: int = 1
    context_dim: int = 768
    norm_groups: int = 32
    time_embed_mult: int = 4
    flip_sin_to_cos: bool = True  # embedding order [cos, sin] when True, [sin, cos] when False
    freq_shift: float = 0.0
    coord_channels: bool = False  # append x/y coordinate channels to the input (CoordConv)
    attention_positions: bool = False  # add 2-D Fourier position features to attention tokens
    context_pool: bool = False  # add a projection of the mean text state to the time embedding
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TextConfig:
    """open_clip text tower. `model` names an open_clip architecture whose text tower is used,
    or "custom" for the width/layers/heads given here. Weights: `pretrained` (an open_clip tag,
    downloaded where a network exists), `weights` (a local file), or neither (random init)."""

    model: str = "custom"
    pretrained: str = ""
    weights: str = ""
    width: int = 512
    # custom towers: 0 keeps no transformer block, so a token's state is its word at its place,
    # untouched by its neighbours (what the tiny demo needs to draw unseen colour+shape pairs)
    layers: int = 12
    heads: int = 8
    embed_dim: int = 0  # pooled-vector (text_projection) width for model="custom"; 0 = width
    context_length: int = 77
    vocab_size: int = 49408
    frozen: bool = True

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ConfigError(f"text.layers must be >= 0, got {self.layers}")


@dataclass(frozen=True)
class DataConfig:
    """Where training pairs come from and how images are shaped."""

    source: str = "shapes"  # shapes | local folder/glob of .tar shards | hf://owner/name | URLs
    subset: str = "512"  # for hf://jackyhate/text-to-image-2M: 512 or 1024
    resolution: int = 64
    crop: str = "center"  # center | random
    hflip: bool = False
    shuffle_buffer: int = 1000  # samples (undecoded bytes) per shuffle window, per worker
    workers: int = 0  # DataLoader workers per rank (0: read in the training process)
    max_bad_fraction: float = 0.05  # stop when more samples than this share were bad ...
    bad_check_after: int = 200  # ... once at least this many samples were seen


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both stages (stage-specific steps and rates below)."""

    stage: str = "all"  # vae | unet | all
    vae_steps: int = 2000
    unet_steps: int = 10000
    batch_size: int = 32
    grad_accum: int = 1
    vae_lr: float = 2e-4
    unet_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # cosine | constant
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)
    compile: bool = False
    ema_decay: float = 0.999
    cond_drop: float = 0.1
    snr_gamma: float = 0.0  # min-SNR cap of the x0-space loss weight (0 = no cap)
    snr_floor: float = 0.0  # floor of that weight (truncated SNR; 0 = no floor), see snr_weight
    kl_weight: float = 1e-6
    recon_loss: str = "l1"  # l1 | mse
    max_nonfinite: int = 10
    seed: int = 0
    sample_every: int = 500
    sample_guidance: float = 5.0  # CFG scale of the grids; t2i-sample/t2i-eval's default
    save_every: int = 1000
    keep_last: int = 3
    cache_latents: bool = False

    def __post_init__(self) -> None:
        for name in ("snr_gamma", "snr_floor"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if 0 < self.snr_gamma < self.snr_floor:
            raise ConfigError(f"train.snr_floor {self.snr_floor} is above train.snr_gamma "
                              f"{self.snr_gamma}: the clamp would be empty")


@dataclass(frozen=True)
class Config:
    """One whole run."""

    preset: str = "custom"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Presets: the only place model sizes are written down
# ----------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], Config]] = {}


def register_preset(name: str) -> Callable[[Callable[[], Config]], Callable[[], Config]]:
    def register(factory: Callable[[], Config]) -> Callable[[], Config]:
        PRESETS[name] = factory
        return factory

    return register


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


@register_preset("tiny")
def tiny() -> Config:
    """CPU demo on the built-in shapes set: 32x32 images, f4 VAE (4x8x8 latents), a 1.7M UNet
    with coordinate channels and position features in attention, and a text side of trainable
    word and position embeddings only (no transformer block) on 20-token prompts.
    Sized so that `t2i-train` finishes both stages in about 15 minutes on 2 CPU cores."""
    return Config(
        preset="tiny",
        # norm_groups=1: with 16 channels, 8 groups normalise pairs of channels and the encoder
        # loses absolute colour; one group (LayerNorm-like) trained to higher PSNR in 500 steps.
        vae=VAEConfig(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, z_channels=4,
                      norm_groups=1),
        unet=UNetConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_levels=(False, True, True), num_heads=4, context_dim=64,
                        norm_groups=8, coord_channels=True, attention_positions=True),
        # layers=0: each word's state is independent of its neighbours, so "square" means the
        # same after "green" as after "red". A 2-layer causal tower mixed them and drew the
        # held-out pairs as the colour's usual shape (held-out shape 50% with it, 83% without).
        text=TextConfig(model="custom", width=64, layers=0, heads=4, context_length=20,
                        frozen=False),
        data=DataConfig(source="shapes", resolution=32),
        # An x0-weight floor with attention_positions makes the model learn position words
        # (eps + min-SNR alone weights the x0 error at t=999 by ~0.005). Floor 0.1 drew the
        # prompted position on 100% of seen prompts, 0.2 on 73% with worse shapes. Guidance 3:
        # at 5 this small model over-saturates colours.
        train=TrainConfig(vae_steps=1400, unet_steps=2200, batch_size=32, vae_lr=1e-3,
                          unet_lr=1e-3, snr_gamma=5.0, snr_floor=0.1, ema_decay=0.995,
                          sample_every=500, save_every=1000, sample_guidance=3.0),
    )


@register_preset("small")
def small() -> Config:
    """256x256, f8 VAE with 4 latent channels, ~100-250M UNet, ViT-B-32-sized text tower."""
    return Config(
        preset="small",
        vae=VAEConfig(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      z_channels=4, norm_groups=32),
        unet=UNetConfig(base_channels=160, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(True, True, True, False), num_heads=5,
                        context_dim=512),  # ~217M; head dims 32/64/128 (flash-attention friendly)
        text=TextConfig(model="ViT-B-32", width=512, layers=12, heads=8, frozen=True),
        data=DataConfig(source="hf://jackyhate/text-to-image-2M", resolution=256,
                        workers=4),
        train=TrainConfig(batch_size=64, vae_steps=50_000, unet_steps=200_000),
    )


@register_preset("base")
def base() -> Config:
    """512x512, Stable-Diffusion-1.x scale (UNet ~860M, ViT-L-14 text tower width 768)."""
    return Config(
        preset="base",
        vae=VAEConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      z_channels=4, norm_groups=32),
        unet=UNetConfig(base_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(True, True, True, False), num_heads=8,
                        context_dim=768),
        text=TextConfig(model="ViT-L-14", width=768, layers=12, heads=12, frozen=True),
        data=DataConfig(source="hf://jackyhate/text-to-image-2M", resolution=512,
                        workers=8),
        train=TrainConfig(batch_size=256, vae_steps=200_000, unet_steps=500_000),
    )


# ----------------------------------------------------------------------------------------------
# Dict / JSON / TOML conversion with strict checking
# ----------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation; return it in the field's type."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a table/object, got {value!r}")
        return from_dict(annotation, value, prefix=key + ".")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} does not match {annotation}")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported field type {annotation}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build `cls` from a (possibly partial) dict; unknown keys and wrong types are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys here: {', '.join(sorted(names))}"
        )
    defaults = cls()
    kwargs = {}
    for name in names:
        if name in data:
            value = data[name]
            if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
                # A partial sub-table updates the default (or preset) sub-config.
                kwargs[name] = merge(getattr(defaults, name), value, prefix=prefix + name + ".")
            else:
                kwargs[name] = _coerce(value, hints[name], prefix + name)
    return dataclasses.replace(defaults, **kwargs)


def merge(cfg: Any, data: dict[str, Any], prefix: str = "") -> Any:
    """Return `cfg` with the (nested, partial) values in `data` applied, strictly checked."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    updates = {}
    for name, value in data.items():
        if name not in names:
            raise ConfigError(
                f"unknown config key {prefix + name!r}; valid keys here: {', '.join(sorted(names))}"
            )
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            updates[name] = merge(getattr(cfg, name), value, prefix=prefix + name + ".")
        else:
            updates[name] = _coerce(value, hints[name], prefix + name)
    return dataclasses.replace(cfg, **updates)


def _parse_literal(text: str) -> Any:
    """`--set` values: JSON where it parses (numbers, true/false, lists), else a plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:  # a,b,c -> list, for tuple fields
            return [_parse_literal(part.strip()) for part in text.split(",")]
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Apply `a.b=value` strings in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        value: Any = _parse_literal(raw)
        hint = _field_type(cfg, parts, dotted)
        if typing.get_origin(hint) is tuple and not isinstance(value, list):
            value = [value]
        if hint is str and not isinstance(value, str):
            value = raw  # e.g. --set data.subset=512 keeps the string
        nested: dict[str, Any] = {parts[-1]: value}
        for part in reversed(parts[:-1]):
            nested = {part: nested}
        cfg = merge(cfg, nested)
    return cfg


def _field_type(cfg: Any, parts: list[str], dotted: str) -> Any:
    node: Any = type(cfg)
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(node) if dataclasses.is_dataclass(node) else {}
        if part not in hints:
            raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} in override {dotted!r}")
        node = hints[part]
    return node


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict (data only, never executed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} does not parse: {err}") from err
    raise ConfigError(f"config file {str(path)!r}: use a .json or .toml file")


def resolve(preset: str = "tiny", file: str | Path | None = None,
            overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Preset, then file values, then `--set` overrides. A file may name its own preset."""
    data = load_file(file) if file else {}
    cfg = get_preset(data.get("preset", preset) if file else preset)
    if data:
        cfg = merge(cfg, data)
    return apply_overrides(cfg, overrides)


def config_from_json(text: str) -> Config:
    """Exact inverse of `to_json` (used for run folders and checkpoint metadata)."""
    return from_dict(Config, json.loads(text))
