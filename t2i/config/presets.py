"""Presets: a registry of small factory functions, the only place model sizes are written down."""

from __future__ import annotations

from typing import Callable

from t2i.config.rules import ConfigError
from t2i.config.sections import Config, DataConfig, TextConfig, TrainConfig, UNetConfig, VAEConfig

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
    """256x256, f8 VAE with 4 latent channels, ~100-250M UNet, frozen pretrained ViT-B-32
    text tower."""
    return Config(
        preset="small",
        # PatchGAN on photos as LDM's kl-f8 (disc_weight 0.5), switched on after the first
        # quarter of stage 1 (LDM: 50001 steps); LPIPS off: it needs a local weights file.
        vae=VAEConfig(base_channels=64, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      z_channels=4, norm_groups=32, disc_weight=0.5, disc_start=12_500),
        unet=UNetConfig(base_channels=160, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(True, True, True, False), num_heads=5,
                        context_dim=512),  # ~217M; head dims 32/64/128 (flash-attention friendly)
        # Frozen pretrained OpenCLIP ViT-B-32 text tower (63M, width 512 = unet.context_dim):
        # laion2b_s34b_b79k beats OpenAI's weights on caption-image matching, what conditioning
        # needs (MSCOCO retrieval 47.8 vs 40.3, ImageNet zero-shot 66.6% vs 63.3%; open_clip's
        # docs/openclip_results.csv) and uses plain GELU, so a local copy of the file passes
        # through --text-encoder PATH unchanged. Offline: see text_hub.py (cache or a file).
        text=TextConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", width=512, layers=12,
                        heads=8, frozen=True),
        data=DataConfig(source="hf://jackyhate/text-to-image-2M", resolution=256,
                        workers=4),
        # vae_betas: LDM's Adam (0.5, 0.9) for GAN autoencoders (its configure_optimizers)
        train=TrainConfig(batch_size=64, vae_steps=50_000, unet_steps=200_000,
                          vae_betas=(0.5, 0.9)),
    )


@register_preset("base")
def base() -> Config:
    """512x512, Stable-Diffusion-1.x scale (UNet ~860M, frozen pretrained ViT-L-14 text tower
    width 768)."""
    return Config(
        preset="base",
        # PatchGAN as LDM's kl-f8: disc_weight 0.5 from step 50_000 (a quarter of stage 1)
        vae=VAEConfig(base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      z_channels=4, norm_groups=32, disc_weight=0.5, disc_start=50_000),
        unet=UNetConfig(base_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                        attention_levels=(True, True, True, False), num_heads=8,
                        context_dim=768),
        # Frozen pretrained ViT-L-14 text tower (123M, width 768 = unet.context_dim): SD 1.x's
        # text encoder architecture (12 layers, 77 tokens). OpenCLIP's laion2b_s32b_b82k rather
        # than SD 1.x's OpenAI weights: better caption-image matching (MSCOCO retrieval 54.9 vs
        # 46.4) at the same ImageNet zero-shot (75.3% vs 75.5%; open_clip's
        # docs/openclip_results.csv), open training data (as SD 2.x's OpenCLIP encoder), and
        # GELU, so a local copy of the file passes through --text-encoder PATH unchanged
        # (OpenAI's needs text.model=ViT-L-14-quickgelu; --text-encoder ViT-L-14:openai is right).
        text=TextConfig(model="ViT-L-14", pretrained="laion2b_s32b_b82k", width=768, layers=12,
                        heads=12, frozen=True),
        data=DataConfig(source="hf://jackyhate/text-to-image-2M", resolution=512,
                        workers=8),
        train=TrainConfig(batch_size=256, vae_steps=200_000, unet_steps=500_000,
                          vae_betas=(0.5, 0.9)),  # LDM's Adam for GAN autoencoders
    )
