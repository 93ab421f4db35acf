"""The tree: one frozen dataclass per part of t2i, and `Config`, one whole run. Each field's legal
values are declared beside it (`ranged`, `one_of`) and checked when its section is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from t2i.config.rules import Section, one_of, ranged

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


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
    norm_groups: int = ranged(32, 1)  # must divide every level width (checks.check_norm_groups)
    mid_attention: bool = True
    channels_last: bool = True  # NHWC activations (False: NCHW): same values, other speed
    # Architecture of imported Stable Diffusion VAEs (t2i/models/vae_import.py); the defaults
    # are t2i's own. "asymmetric": pad (0,1,0,1), then the stride-2 conv (LDM, diffusers).
    downsample_padding: str = one_of("symmetric", ("symmetric", "asymmetric"))
    attention_bias: bool = False  # biases on the middle attention's q/k/v projections
    post_quant_conv: bool = False  # a 1x1 conv on z before the decoder's conv_in (SD's)
    # Stage-1 training only (t2i/train/gan.py): they never change the VAE's tensors, so VAE
    # files that differ only in these stay interchangeable (see TRAINING_ONLY).
    disc_weight: float = ranged(0.0, 0)  # PatchGAN hinge term x adaptive weight (0 = no GAN)
    disc_start: int = ranged(0, 0)  # step at which the discriminator and its term switch on
    disc_channels: int = ranged(64, 1)  # width of the discriminator's first convolution
    disc_layers: int = ranged(3, 1)  # stride-2 convolutions (3: 70x70-pixel patches)
    disc_lr: float = ranged(0.0, 0)  # discriminator AdamW learning rate (0: train.vae_lr)
    lpips_weight: float = ranged(0.0, 0)  # LPIPS-VGG16 term (needs lpips_weights)
    lpips_weights: str = ""  # local LPIPS file (t2i.models.lpips format); never downloaded
    # fine-tune the decoder alone (--init-from VAEFILE): the encoder keeps the file's weights,
    # so latents already encoded with it (and a UNet trained on them) stay valid
    freeze_encoder: bool = False

    TRAINING_ONLY: ClassVar[tuple[str, ...]] = (
        "disc_weight", "disc_start", "disc_channels", "disc_layers", "disc_lr", "lpips_weight",
        "lpips_weights", "freeze_encoder")

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
    channels_last: bool = True  # NHWC activations (False: NCHW): same values, other speed


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
    # held-out shards for the validation loss (a folder, glob or list like `source`); or ...
    val_source: str = ""
    # ... this fraction of `source`'s shards, chosen by a hash of the shard's file name (stable
    # whatever the order or number of other shards; at least one) and never trained on
    val_fraction: float = ranged(0.0, 0, 1, high_open=True)


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
    # the VAE's AdamW (beta1, beta2); LDM trains its GAN autoencoders with (0.5, 0.9)
    vae_betas: tuple[float, ...] = ranged((0.9, 0.999), 0, 1, high_open=True)
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
    kl_weight: float = ranged(1e-6, 0)  # LDM's scale: KL over 3HW beside the mean L1, see kl_term
    recon_loss: str = one_of("l1", ("l1", "mse"))
    max_nonfinite: int = ranged(10, 1)
    seed: int = ranged(0, 0, 2**63 - 1)  # torch generators take 64-bit seeds
    sample_every: int = ranged(500, 0)  # 0: no sample grids
    sample_guidance: float = ranged(5.0, 0)  # CFG scale of the grids; t2i-sample/t2i-eval's default
    save_every: int = ranged(1000, 0)  # 0: only at the end of a stage
    keep_last: int = ranged(3, 0)  # 0: keep every checkpoint
    cache_latents: bool = False
    val_every: int = ranged(0, 0)  # steps between validation losses of stage 2 (0: off)
    val_samples: int = ranged(64, 1)  # size of the fixed validation set (its first samples)
    val_timesteps: int = ranged(8, 1)  # the fixed grid: midpoints of this many equal t bins
    val_batch_size: int = ranged(32, 1)  # rows per validation forward (part of the set's
    # definition: another batch size can change the last bits of the number)


@dataclass(frozen=True)
class InitFromConfig(Section):
    """The parent checkpoint whose weights and EMA a run's `stage` started from at step 0
    (`t2i-train --init-from`; t2i/train/init_from.py). Written by the command, not by hand: the
    sha256 pair is checked when the stage starts. `stage` "" (the default): a run from scratch."""

    key: ClassVar[str] = "init_from"

    stage: str = one_of("", ("", "vae", "unet"))
    path: str = ""  # what was given to --init-from (a run folder or a checkpoint folder)
    checkpoint: str = ""  # the checkpoint folder read, RUN/<stage>/ckpt-N
    step: int = ranged(0, 0)  # the parent's step there
    sha256: str = ""  # of its model.safetensors
    ema_sha256: str = ""  # of its ema.safetensors
    kind: str = one_of("checkpoint", ("checkpoint", "vae_file"))
    # kind "vae_file": a stage-1 parent that is a VAE file (t2i/train/init_vae.py: a t2i
    # vae.safetensors, a diffusers folder, an LDM file); it has no EMA: ema_sha256 "",
    # checkpoint = the file or folder read, sha256 = its vae_sha256-style identity (a t2i
    # file's own sha256), step = the file's.


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
    init_from: InitFromConfig = field(default_factory=InitFromConfig)
