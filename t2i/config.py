"""Frozen configuration tree for every part of t2i, presets, and file / override loading.

Every part of the system is configured by a frozen dataclass below. A whole run is one `Config`.
Presets are small factory functions in a registry (`PRESETS`); no other module hard-codes model
sizes. Configs load from JSON or TOML, take `a.b=value` overrides, reject unknown keys and wrong
types with an error naming the key, and round-trip to JSON exactly.

Each field declares its legal values beside it (`ranged`, `one_of`; every float must be finite).
`validate` checks them and the combinations the models, the schedule and the optimizer need; it
runs whenever a config is resolved, overridden or read back, so a bad value fails before any
work starts. The UNet, VAE, text tower and noise schedule run the same checks (`check_unet`, ...)
when built from a config directly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar


class ConfigError(ValueError):
    """A configuration value, key, file or preset is invalid; the message names it."""


# ----------------------------------------------------------------------------------------------
# Legal values: each field's rule, declared beside it and checked when its section is built
# ----------------------------------------------------------------------------------------------

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLIP_VOCAB_SIZE = 49408  # open_clip's BPE tokenizer emits ids below this (custom towers)


@dataclass(frozen=True)
class Rule:
    """The legal values of one field (of each item, for a tuple field): an interval, whose ends
    are excluded when `low_open` / `high_open`, or a set of `choices`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def allows(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return low_ok and high_ok

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.low == self.high:
            return str(self.low)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low}, {self.high}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"{'<' if self.high_open else '<='} {self.high}"


def ranged(default: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> Any:
    """A field whose values (tuple items) must lie in [low, high] (ends excluded when open)."""
    return field(default=default, metadata={"rule": Rule(low, high, low_open, high_open)})


def one_of(default: str, choices: tuple[str, ...]) -> Any:
    """A string field that must be one of `choices`."""
    return field(default=default, metadata={"rule": Rule(choices=choices)})


def check_fields(section: Any, prefix: str) -> None:
    """Each field of one config dataclass against its rule (each item of a tuple, which must not
    be empty); every float must be finite."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        rule = f.metadata.get("rule")
        if value == ():
            raise ConfigError(f"{prefix}{f.name} must not be empty")
        for item in value if isinstance(value, tuple) else (value,):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{prefix}{f.name} must be a finite number, got {item}")
            if rule is not None and not rule.allows(item):
                raise ConfigError(f"{prefix}{f.name} must be {rule.describe()}, got {item!r}")


class Section:
    """A part of the config: every field is checked against its rule when the part is built, so
    no config object holds an illegal single value (combinations: see `validate`)."""

    key: ClassVar[str] = ""  # its key in Config

    def __post_init__(self) -> None:
        check_fields(self, f"{self.key}.")


# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """Training noise schedule (DDPM betas) and what the network predicts."""

    key: ClassVar[str] = "schedule"

    num_train_timesteps: int = ranged(1000, 2)
    beta_start: float = ranged(0.00085, 0, 1, low_open=True, high_open=True)
    beta_end: float = ranged(0.012, 0, 1, low_open=True, high_open=True)
    beta_schedule: str = one_of("scaled_linear", BETA_SCHEDULES)
    prediction_type: str = one_of("epsilon", PREDICTION_TYPES)
    # multiply SNR(t) at every t (< 1: noisier), see scale_snr
    snr_scale: float = ranged(1.0, 0, low_open=True)


@dataclass(frozen=True)
class VAEConfig(Section):
    """KL autoencoder (stage 1). The downsampling factor is 2 ** (len(channel_mult) - 1)."""

    key: ClassVar[str] = "vae"

    in_channels: int = ranged(3, 3, 3)  # RGB: every image t2i reads or writes has 3 channels
    base_channels: int = ranged(128, 1)
    channel_mult: tuple[int, ...] = ranged((1, 2, 4, 4), 1)
    num_res_blocks: int = ranged(2, 0)
    z_channels: int = ranged(4, 1)
    norm_groups: int = ranged(32, 1)  # clipped to a divisor of each width (group_norm)
    mid_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class UNetConfig(Section):
    """Latent denoiser (stage 2) with time embedding and cross-attention to text states."""

    key: ClassVar[str] = "unet"

    in_channels: int = ranged(4, 1)  # = vae.z_channels
    out_channels: int = ranged(4, 1)  # = vae.z_channels
    base_channels: int = ranged(320, 2)  # also the timestep embedding width
    channel_mult: tuple[int, ...] = ranged((1, 2, 4, 4), 1)
    num_res_blocks: int = ranged(2, 0)
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    num_heads: int = ranged(8, 1)
    transformer_depth: int = ranged(1, 1)
    context_dim: int = ranged(768, 1)  # = text.width
    norm_groups: int = ranged(32, 1)
    time_embed_mult: int = ranged(4, 1)
    flip_sin_to_cos: bool = True  # embedding order [cos, sin] when True, [sin, cos] when False
    freq_shift: float = ranged(0.0, 0)  # below base_channels // 2, see timestep_embedding
    coord_channels: bool = False  # append x/y coordinate channels to the input (CoordConv)
    attention_positions: bool = False  # add 2-D Fourier position features to attention tokens
    context_pool: bool = False  # add a projection of the mean text state to the time embedding
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class TextConfig(Section):
    """open_clip text tower. `model` names an open_clip architecture whose text tower is used,
    or "custom" for the width/layers/heads given here. Weights: `pretrained` (an open_clip tag,
    downloaded where a network exists), `weights` (a local file), or neither (random init)."""

    key: ClassVar[str] = "text"

    model: str = "custom"
    pretrained: str = ""
    weights: str = ""
    width: int = ranged(512, 1)
    # custom towers: 0 keeps no transformer block, so a token's state is its word at its place,
    # untouched by its neighbours (what the tiny demo needs to draw unseen colour+shape pairs)
    layers: int = ranged(12, 0)
    heads: int = ranged(8, 1)
    embed_dim: int = ranged(0, 0)  # pooled-vector (text_projection) width for model="custom"; 0 = width
    context_length: int = ranged(77, 2)  # start and end tokens at least
    vocab_size: int = ranged(49408, 1)
    frozen: bool = True


@dataclass(frozen=True)
class DataConfig(Section):
    """Where training pairs come from and how images are shaped."""

    key: ClassVar[str] = "data"

    source: str = "shapes"  # shapes | local folder/glob of .tar shards | hf://owner/name | URLs
    subset: str = one_of("512", ("512", "1024"))  # for hf://jackyhate/text-to-image-2M
    resolution: int = ranged(64, 8)  # a multiple of the VAE x UNet downsampling
    crop: str = one_of("center", ("center", "random"))
    hflip: bool = False
    shuffle_buffer: int = ranged(1000, 1)  # samples (undecoded bytes) per shuffle window, per worker
    workers: int = ranged(0, 0)  # DataLoader workers per rank (0: read in the training process)
    max_bad_fraction: float = ranged(0.05, 0, 1)  # stop when more samples than this share were bad ...
    bad_check_after: int = ranged(200, 0)  # ... once at least this many samples were seen


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimisation settings shared by both stages (stage-specific steps and rates below)."""

    key: ClassVar[str] = "train"

    stage: str = one_of("all", ("vae", "unet", "all"))
    vae_steps: int = ranged(2000, 1)
    unet_steps: int = ranged(10000, 1)
    batch_size: int = ranged(32, 1)  # global, per optimizer step; a multiple of grad_accum
    grad_accum: int = ranged(1, 1)
    vae_lr: float = ranged(2e-4, 0, low_open=True)
    unet_lr: float = ranged(1e-4, 0, low_open=True)
    warmup_steps: int = ranged(100, 0)
    lr_schedule: str = one_of("cosine", ("cosine", "constant"))
    weight_decay: float = ranged(0.01, 0)
    grad_clip: float = ranged(1.0, 0, low_open=True)  # max global gradient norm (always clipped)
    precision: str = one_of("auto", PRECISIONS)  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    ema_decay: float = ranged(0.999, 0, 1)
    cond_drop: float = ranged(0.1, 0, 1, high_open=True)  # 1 would never show the model a prompt
    snr_gamma: float = ranged(0.0, 0)  # min-SNR cap of the x0-space loss weight (0 = no cap)
    snr_floor: float = ranged(0.0, 0)  # floor of that weight (truncated SNR; 0 = no floor), see snr_weight
    kl_weight: float = ranged(1e-6, 0)
    recon_loss: str = one_of("l1", ("l1", "mse"))
    max_nonfinite: int = ranged(10, 1)
    seed: int = ranged(0, 0, 2**63 - 1)  # torch generators take 64-bit seeds
    sample_every: int = ranged(500, 0)  # 0: no sample grids
    sample_guidance: float = ranged(5.0, 0)  # CFG scale of the grids; t2i-sample/t2i-eval's default
    save_every: int = ranged(1000, 0)  # 0: only at the end of a stage
    keep_last: int = ranged(3, 0)  # 0: keep every checkpoint
    cache_latents: bool = False


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
# Validation of combinations: what the models and the optimizer need of several fields together
# (each field alone is checked when its section is built). The UNet and the text tower call the
# same checks when built from a config directly.
# ----------------------------------------------------------------------------------------------


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


def check_data(cfg: DataConfig) -> None:
    if not cfg.source.strip():
        raise ConfigError("data.source must not be empty (shapes, a shard folder or hf://...)")


def check_train(cfg: TrainConfig) -> None:
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(f"train.batch_size {cfg.batch_size} must be divisible by "
                          f"train.grad_accum {cfg.grad_accum}")
    if 0 < cfg.snr_gamma < cfg.snr_floor:
        raise ConfigError(f"train.snr_floor {cfg.snr_floor} is above train.snr_gamma "
                          f"{cfg.snr_gamma}: the clamp would be empty")


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


def validate(cfg: Config) -> Config:
    """`cfg` if every value is legal, else a ConfigError naming the first bad key."""
    check_unet(cfg.unet)
    check_text(cfg.text)
    check_data(cfg.data)
    check_train(cfg.train)
    check_wiring(cfg)
    return cfg


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
        if not math.isfinite(value):
            raise ConfigError(f"config key {key!r}: expected a finite number, got {value!r}")
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
    """Apply `a.b=value` strings in order, then `validate` the result."""
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
    return validate(cfg)


def field_rule(key: str) -> tuple[Any, Rule | None]:
    """(type, rule) of the field at dotted `key`, e.g. "train.grad_accum" -> (int, >= 1): what a
    command-line option that sets this key may accept."""
    section, name = key.split(".")
    cls = typing.get_type_hints(Config)[section]
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return typing.get_type_hints(cls)[name], f.metadata.get("rule")


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
    return validate(from_dict(Config, json.loads(text)))
