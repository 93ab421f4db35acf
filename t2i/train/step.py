"""Training steps for both stages: `train_step(state, batch) -> (state, metrics)`.

A step draws its randomness from generators derived from (seed, step, rank) *outside* the
compiled region, runs the objective (forward + loss) under autocast and optionally
`torch.compile`, back-propagates over `grad_accum` micro-batches (`accumulate_gradients`), and
hands the gradients to `state.apply_gradients` with the learning rate and EMA decay of the step:
clip, AdamW, EMA. What a step changes in place (gradients, parameters, optimizer moments, the
grad scaler, EMA weights, the latent cache) is listed in state.py's docstring; nothing else.

Stage 1 with the PatchGAN and LPIPS terms (vae.disc_weight, vae.lpips_weight) has its own
step, `gan.vae_gan_train_step`, built on the helpers here; `vae_train_step` is the plain one.

No host sync happens inside a step: a non-finite loss or gradient norm is turned into the
fused optimizer's `found_inf` flag, which makes the kernel skip the update on the device; the
metrics come back as tensors and are read at log intervals only. The objectives' forward and
the randomness helpers are pure.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from t2i import rng
from t2i.train.state import TrainState, apply_gradients, ema_decay_at, lr_at

Batch = dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Objectives: nn.Modules whose forward returns the per-sample loss (B,), so DDP and
# torch.compile can wrap them directly. All randomness comes in as tensors.
# ----------------------------------------------------------------------------------------------


def kl_term(posterior: Any, images: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over the latent, over the image's element count 3*H*W:
    (B,) nats per image element. LDM (Rombach et al. 2022, taming's LPIPSWithDiscriminator)
    sums the reconstruction over pixels and adds kl_weight * KL (1e-6 for kl-f8); t2i's
    reconstruction is the per-element mean, so the KL is divided by 3*H*W to keep kl_weight on
    LDM's scale (undivided, 1e-6 here would weigh KL 3*H*W times more: ~2e5 at 256 px)."""
    return posterior.kl().float() / images[0].numel()


class VAEObjective(nn.Module):
    """Stage 1: reconstruction (L1 or MSE, mean over elements) + kl_weight * kl_term."""

    def __init__(self, vae: nn.Module, recon_loss: str, kl_weight: float):
        super().__init__()
        self.vae, self.recon_loss, self.kl_weight = vae, recon_loss, kl_weight

    def forward(self, images: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(images)
        z = posterior.mean + torch.exp(0.5 * posterior.logvar) * eps  # reparameterised sample
        recon = self.vae.decode(z).float()
        err = (recon - images).abs() if self.recon_loss == "l1" else (recon - images) ** 2
        return err.mean(dim=(1, 2, 3)) + self.kl_weight * kl_term(posterior, images)  # (B,)


def snr_weight(snr: torch.Tensor, prediction_type: str, gamma: float, floor: float) -> torch.Tensor:
    """(B,) loss weights that make the per-sample loss clamp(SNR, floor, gamma) * ||x0 - x0_hat||^2.

    The eps error is sqrt(SNR) times the x0 error and the v error sqrt(SNR + 1) times it, so the
    unweighted eps loss weights x0 by SNR and the v loss by SNR + 1. min-SNR (Hang et al. 2023)
    caps that at gamma; the floor (the truncated-SNR weighting of Salimans & Ho 2022, sec. 4)
    keeps weight on the high-noise steps, where layout is decided: with eps and min-SNR alone
    their x0 weight is SNR, ~0.005 at t=999, and a small model never learns "on the left".
    gamma = 0 removes the cap, floor = 0 the floor; both 0 is the plain loss (weights 1)."""
    if gamma <= 0 and floor <= 0:
        return torch.ones_like(snr)
    x0_weight = snr.clamp(min=floor if floor > 0 else None, max=gamma if gamma > 0 else None)
    return x0_weight / (snr + 1 if prediction_type == "v_prediction" else snr)


class DiffusionObjective(nn.Module):
    """Stage 2: w(t) * ||target - unet(x_t, t, text)||^2 with the SNR weighting of `snr_weight`."""

    def __init__(self, unet: nn.Module, text: nn.Module | None, schedule: Any,
                 prediction_type: str, snr_gamma: float, snr_floor: float = 0.0):
        super().__init__()
        self.unet, self.text = unet, text  # text is None when frozen (states come precomputed)
        self.schedule, self.prediction_type = schedule, prediction_type
        self.snr_gamma, self.snr_floor = snr_gamma, snr_floor

    def forward(self, latents: torch.Tensor, text_in: torch.Tensor, t: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        states = self.text(text_in)[0] if self.text is not None else text_in  # (B, L, D)
        x_t = self.schedule.add_noise(latents, noise, t)
        target = self.schedule.target(latents, noise, t, self.prediction_type)
        pred = self.unet(x_t, t, states).float()
        per_sample = ((pred - target.float()) ** 2).mean(dim=(1, 2, 3))  # (B,)
        if self.snr_gamma > 0 or self.snr_floor > 0:
            weight = snr_weight(self.schedule.snr(t).float(), self.prediction_type,
                                self.snr_gamma, self.snr_floor)
            per_sample = per_sample * weight
        return per_sample


# ----------------------------------------------------------------------------------------------
# Step settings and randomness
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepSettings:
    """Static settings of a step (resolved from the config once)."""

    base_lr: float
    warmup_steps: int
    total_steps: int
    lr_schedule: str
    grad_clip: float
    grad_accum: int
    ema_decay: float
    ema_warmup: bool  # False when the stage started from a parent's EMA (--init-from)
    autocast_dtype: torch.dtype | None  # None: fp32
    device: torch.device
    rank: int = 0
    world_size: int = 1


def finite_everywhere(losses: torch.Tensor, world_size: int) -> torch.Tensor:
    """True (a device bool) when `losses` are finite on every rank. The gradients are
    all-reduced but the loss is not: a rank whose loss alone were non-finite would skip its
    update while the others applied theirs, and the replicas would drift apart unseen. One
    all-reduce (MAX) of a flag on the device when world_size > 1; no host sync."""
    finite = torch.isfinite(losses).all()
    if world_size > 1:
        bad = (~finite).to(torch.int32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        finite = bad == 0
    return finite


def autocast(settings: StepSettings) -> contextlib.AbstractContextManager:
    if settings.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(settings.device.type, dtype=settings.autocast_dtype)


def step_generator(state: TrainState, purpose: str, settings: StepSettings) -> torch.Generator:
    """Randomness for one purpose at one step, derived from (seed, purpose, step) only; the
    whole global batch is drawn on every rank and each rank takes its rows, so a run on N ranks
    draws exactly the numbers a single process with the same global batch draws."""
    return rng.generator(state.seed, purpose, state.step, device=settings.device)


def rank_rows(x: torch.Tensor, settings: StepSettings) -> torch.Tensor:
    rows = x.shape[0] // settings.world_size
    return x[settings.rank * rows:(settings.rank + 1) * rows]


# ----------------------------------------------------------------------------------------------
# The shared update: accumulate gradients, then apply them (state.apply_gradients)
# ----------------------------------------------------------------------------------------------


def apply_update(state: TrainState, objective: Callable[..., torch.Tensor],
                 micro_inputs: list[tuple], settings: StepSettings,
                 no_sync: Callable[[], contextlib.AbstractContextManager]) -> tuple[TrainState, dict]:
    """Gradients over the micro-batches, then the update at the step's learning rate and EMA
    decay (both computed here from `state.step`). Returns the state at step + 1 and the metrics
    as device tensors."""
    per_sample_loss = accumulate_gradients(state, objective, micro_inputs, settings, no_sync)
    lr = lr_at(state.step, settings.base_lr, settings.warmup_steps, settings.total_steps,
               settings.lr_schedule)
    state, grad_norm, finite = apply_gradients(
        state, lr, ema_decay_at(state.step, settings.ema_decay, settings.ema_warmup), settings.grad_clip,
        loss_finite=finite_everywhere(per_sample_loss, settings.world_size))
    metrics = {"loss": per_sample_loss.mean(), "per_sample_loss": per_sample_loss,
               "grad_norm": grad_norm, "skipped": (~finite).to(torch.int32)}
    return state, metrics


def accumulate_gradients(state: TrainState, objective: Callable[..., torch.Tensor],
                         micro_inputs: list[tuple], settings: StepSettings,
                         no_sync: Callable[[], contextlib.AbstractContextManager]) -> torch.Tensor:
    """Forward/backward over the micro-batches: the trainable parameters' `.grad` is set to None,
    then holds the gradient of the big-batch mean loss (times the fp16 loss scale, which the
    GradScaler creates on its first call). DDP all-reduces on the last micro-batch only.
    Returns the per-sample losses (B,) of this rank, detached."""
    state.optimizer.zero_grad(set_to_none=True)
    scaler, per_sample = state.scaler, []
    for i, inputs in enumerate(micro_inputs):
        last = i == len(micro_inputs) - 1
        with (contextlib.nullcontext() if last else no_sync()), autocast(settings):
            losses = objective(*inputs)  # (b,)
        loss = losses.mean() / len(micro_inputs)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        per_sample.append(losses.detach())
    return torch.cat(per_sample)


def split(x: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(torch.chunk(x, parts, dim=0))


# ----------------------------------------------------------------------------------------------
# Stage steps
# ----------------------------------------------------------------------------------------------


def vae_train_step(state: TrainState, batch: Batch, objective: Callable, settings: StepSettings,
                   latent_shape: tuple[int, int, int],
                   no_sync: Callable = contextlib.nullcontext) -> tuple[TrainState, dict]:
    """One VAE step. batch["image"]: this rank's rows (b, 3, H, W) in [-1, 1]."""
    images = batch["image"].to(settings.device, non_blocking=True)
    global_b = images.shape[0] * settings.world_size
    eps = torch.randn((global_b, *latent_shape), generator=step_generator(state, "vae-z", settings),
                      device=settings.device)
    eps = rank_rows(eps, settings)  # (b, z, h, w)
    micro = list(zip(split(images, settings.grad_accum), split(eps, settings.grad_accum)))
    return apply_update(state, objective, micro, settings, no_sync)


def diffusion_train_step(state: TrainState, batch: Batch, objective: Callable,
                         settings: StepSettings, encode: Callable[[Batch, torch.Tensor], torch.Tensor],
                         text_input: Callable[[Batch, torch.Tensor], torch.Tensor],
                         latent_shape: tuple[int, int, int], num_train_timesteps: int,
                         cond_drop: float,
                         no_sync: Callable = contextlib.nullcontext) -> tuple[TrainState, dict]:
    """One diffusion step.

    `encode(batch, eps_z)` returns scaled latents (b, C, h, w) (VAE under no_grad, or the latent
    cache, which it fills with the keys it has not seen: see unet_stage.latent_encoder);
    `text_input(batch, drop)` returns tokens (trainable encoder) or states (frozen encoder) with
    the rows where `drop` is True replaced by the empty prompt (classifier-free guidance)."""
    b = len(batch["prompt"])
    global_b = b * settings.world_size
    gen = step_generator(state, "diffusion", settings)
    t = rank_rows(torch.randint(0, num_train_timesteps, (global_b,), generator=gen,
                                device=settings.device), settings)
    noise = rank_rows(torch.randn((global_b, *latent_shape), generator=gen, device=settings.device),
                      settings)
    eps_z = rank_rows(torch.randn((global_b, *latent_shape), generator=gen, device=settings.device),
                      settings)
    drop = rank_rows(torch.rand((global_b,), generator=gen, device=settings.device) < cond_drop,
                     settings)
    with autocast(settings):  # frozen VAE encoder and text tower at the step's precision
        latents = encode(batch, eps_z).float()  # (b, C, h, w) float32, as the cache stores them
        text_in = text_input(batch, drop)  # tokens, or the frozen tower's states
    k = settings.grad_accum
    micro = list(zip(split(latents, k), split(text_in, k), split(t, k), split(noise, k)))
    state, metrics = apply_update(state, objective, micro, settings, no_sync)
    metrics["t"] = t
    return state, metrics

