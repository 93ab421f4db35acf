"""Stage 1 with adversarial and perceptual terms: the LDM autoencoder objective (Esser et al.
2021, "Taming Transformers", sec. 3.2 eq. 4-7; Rombach et al. 2022, app. G).

Generator (the VAE), per sample, with x_hat = decode(mean + std * eps):

    L_rec = |x - x_hat| (or squared, train.recon_loss) + vae.lpips_weight * LPIPS(x, x_hat)
    L_G   = L_rec + train.kl_weight * KL / (3HW) + lambda * L_gan,   L_gan = -mean(D(x_hat))

    lambda = vae.disc_weight * clamp(||grad_W L_rec|| / (||grad_W L_gan|| + 1e-4), 0, 1e4)

(L_rec is a mean over the image's 3HW elements where LDM sums it, so the KL, a sum over the
latent, is divided by 3HW: kl_weight keeps LDM's scale; see step.kl_term), with W the decoder's
last convolution weight (the adaptive weight of Esser et al. eq. 7), both
gradients of the micro-batch's mean losses, averaged over torchrun ranks before the norms (so
with train.grad_accum=1 a run on N ranks computes the lambda one process with the whole global
batch computes). Discriminator, hinge loss (Lim & Ye 2017; as LDM):

    L_D = 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat.detach()))))

Both GAN terms are on from step vae.disc_start (LDM's disc_factor switch); before it the
discriminator is neither run nor updated. The discriminator sees the reconstructions of the
generator pass (before the VAE's update), so a step runs the VAE forward once; LDM's Lightning
loop ran it again for the discriminator. Not followed: LDM's learned output log-variance
(initialised at 0, it only rescales L_rec; we keep L_rec as t2i's plain mean).

No host sync: lambda is computed on the device with `torch.autograd.grad` (which returns the
gradients instead of accumulating them, so it changes nothing in place); every metric stays a
device tensor. The discriminator is a second TrainState in `state.disc` (see state.py's list of
in-place changes); its forward in the generator pass uses detached parameters
(`torch.func.functional_call`), so no gradient reaches it there.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from t2i.train import distributed
from t2i.train.state import TrainState, apply_gradients, ema_decay_at, lr_at
from t2i.train.step import (Batch, StepSettings, autocast, finite_everywhere, kl_term,
                            rank_rows, split, step_generator)

ADAPTIVE_EPS, ADAPTIVE_MAX = 1e-4, 1e4  # as in Esser et al.'s code


@dataclass(frozen=True)
class GANSettings:
    """The stage-1 loss weights (see the module docstring), resolved from the config."""

    kl_weight: float
    lpips_weight: float
    disc_weight: float  # 0: no discriminator
    disc_start: int
    disc_lr: float  # resolved: train.vae_lr when vae.disc_lr is 0
    world: distributed.World = distributed.World()


@dataclass(frozen=True)
class Adversary:
    """The discriminator as the step uses it: `forward` (DDP-wrapped under torchrun) for its own
    update, `module` (the bare network) for the generator pass, `no_sync` for micro-batches, and
    `last_layer`, the VAE decoder's last convolution weight for the adaptive weight."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    module: nn.Module
    no_sync: Callable[[], contextlib.AbstractContextManager]
    last_layer: nn.Parameter


# ----------------------------------------------------------------------------------------------
# Losses (pure)
# ----------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample discriminator hinge loss (B,) from logit maps (B, 1, h, w)."""
    real = F.relu(1.0 - logits_real.float()).mean(dim=(1, 2, 3))
    fake = F.relu(1.0 + logits_fake.float()).mean(dim=(1, 2, 3))
    return 0.5 * (real + fake)


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Per-sample generator loss -mean(D(x_hat)) (B,) from logit maps (B, 1, h, w)."""
    return -logits_fake.float().mean(dim=(1, 2, 3))


def adaptive_weight(grad_rec: torch.Tensor, grad_gan: torch.Tensor) -> torch.Tensor:
    """clamp(||grad_rec|| / (||grad_gan|| + 1e-4), 0, 1e4), a detached 0-dim device tensor
    (Esser et al. 2021, eq. 7); the caller multiplies by vae.disc_weight."""
    ratio = torch.linalg.vector_norm(grad_rec) / (torch.linalg.vector_norm(grad_gan) + ADAPTIVE_EPS)
    return ratio.clamp(0.0, ADAPTIVE_MAX).detach()


def last_layer_grads(rec_loss: torch.Tensor, gan_loss: torch.Tensor, weight: nn.Parameter,
                     scaler: torch.amp.GradScaler | None, world: distributed.World
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of two scalar losses w.r.t. `weight`, averaged over ranks (one all-reduce,
    no host sync). Under fp16 both losses are scaled by the GradScaler's scale first (their
    fp16 gradients would underflow) and the gradients unscaled after. The graphs are kept for
    the backward that follows."""
    scale = scaler.scale(torch.ones((), device=weight.device)) if scaler is not None else None
    if scale is not None:
        rec_loss, gan_loss = rec_loss * scale, gan_loss * scale
    (g_rec,) = torch.autograd.grad(rec_loss, weight, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, weight, retain_graph=True)
    both = torch.stack([g_rec, g_gan])  # (2, *weight.shape), the weight's dtype
    if scale is not None:
        both = both / scale
    if world.distributed:
        both = distributed.all_sum(world, both) / world.world_size
    return both[0], both[1]


def frozen_logits(disc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """D(x) (B, 1, h, w) through detached parameters: gradients reach x, never D."""
    params = {name: p.detach() for name, p in disc.named_parameters()}
    return torch.func.functional_call(disc, params, (x,))


class VAELossTerms(nn.Module):
    """Stage 1's per-sample terms for the GAN / LPIPS step: forward(images, eps) ->
    (pixel (B,), perceptual (B,) (zeros without LPIPS), kl (B,) (step.kl_term), reconstruction (B, 3, H, W)
    float32). The LPIPS network, when given, is frozen."""

    def __init__(self, vae: nn.Module, recon_loss: str, lpips: nn.Module | None):
        super().__init__()
        self.vae, self.recon_loss, self.lpips = vae, recon_loss, lpips

    def forward(self, images: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(images)
        z = posterior.mean + torch.exp(0.5 * posterior.logvar) * eps  # reparameterised sample
        recon = self.vae.decode(z).float()  # (B, 3, H, W)
        err = (recon - images).abs() if self.recon_loss == "l1" else (recon - images) ** 2
        pixel = err.mean(dim=(1, 2, 3))  # (B,)
        perceptual = (self.lpips(recon, images) if self.lpips is not None
                      else torch.zeros_like(pixel))
        return pixel, perceptual, kl_term(posterior, images), recon


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------


def vae_gan_train_step(state: TrainState, batch: Batch, objective: Callable, settings: StepSettings,
                       gan: GANSettings, latent_shape: tuple[int, int, int],
                       adversary: Adversary | None,
                       no_sync: Callable = contextlib.nullcontext) -> tuple[TrainState, dict]:
    """One stage-1 step with the LPIPS and / or GAN terms: the VAE's update (gradients over the
    micro-batches, then `apply_gradients`), then, from vae.disc_start on, the discriminator's
    (`state.disc`). batch["image"]: this rank's rows (b, 3, H, W) in [-1, 1]. The latent noise
    is drawn exactly as `step.vae_train_step` draws it. Returns the state at step + 1 (with its
    discriminator) and the metrics as device tensors; `metrics["scalars"]` holds rec_loss,
    lpips, and once the discriminator is on gan_g, adaptive_weight, gan_d, logits_real,
    logits_fake and disc_grad_norm."""
    images = batch["image"].to(settings.device, non_blocking=True)
    eps = torch.randn((images.shape[0] * settings.world_size, *latent_shape),
                      generator=step_generator(state, "vae-z", settings), device=settings.device)
    eps = rank_rows(eps, settings)  # (b, z, h, w)
    on = adversary is not None and state.step >= gan.disc_start
    micro = list(zip(split(images, settings.grad_accum), split(eps, settings.grad_accum)))
    per_sample, recons, scalars = generator_gradients(state, objective, micro, settings, gan,
                                                      adversary if on else None, no_sync)
    lr = lr_at(state.step, settings.base_lr, settings.warmup_steps, settings.total_steps,
               settings.lr_schedule)
    disc = state.disc
    new_state, grad_norm, finite = apply_gradients(
        state, lr, ema_decay_at(state.step, settings.ema_decay, settings.ema_warmup), settings.grad_clip,
        loss_finite=finite_everywhere(per_sample, settings.world_size))
    if on:
        disc, disc_finite, disc_scalars = discriminator_update(
            disc, adversary, [m[0] for m in micro], recons, settings, gan)
        finite = finite & disc_finite
        scalars.update(disc_scalars)
    elif disc is not None:
        disc = dataclasses.replace(disc, step=disc.step + 1)  # its step follows the VAE's
    metrics = {"loss": per_sample.mean(), "per_sample_loss": per_sample, "grad_norm": grad_norm,
               "skipped": (~finite).to(torch.int32), "scalars": scalars}
    return dataclasses.replace(new_state, disc=disc), metrics


def generator_gradients(state: TrainState, objective: Callable, micro: list[tuple],
                        settings: StepSettings, gan: GANSettings, adversary: Adversary | None,
                        no_sync: Callable) -> tuple[torch.Tensor, list[torch.Tensor], dict]:
    """The VAE's `.grad` set to None, then the gradient of the big-batch mean of L_G (times the
    fp16 loss scale); the GAN term only when `adversary` is given (the discriminator is on).
    Returns this rank's per-sample L_G (B,), the detached reconstructions of each micro-batch
    and the mean terms (device scalars)."""
    state.optimizer.zero_grad(set_to_none=True)
    k, scaler = len(micro), state.scaler
    per_sample, recons, pixel, perceptual, gan_g, weights = [], [], [], [], [], []
    for i, (images, eps) in enumerate(micro):
        with (contextlib.nullcontext() if i == k - 1 else no_sync()), autocast(settings):
            pix, perc, kl, recon = objective(images, eps)  # 3 x (b,), (b, 3, H, W)
            rec = pix + gan.lpips_weight * perc  # (b,)
            losses = rec + gan.kl_weight * kl
            if adversary is not None:
                g = hinge_g_loss(frozen_logits(adversary.module, recon))  # (b,)
        if adversary is not None:
            lam = gan.disc_weight * adaptive_weight(*last_layer_grads(
                rec.mean(), g.mean(), adversary.last_layer, scaler, gan.world))
            losses = losses + lam * g
            gan_g.append(g.detach())
            weights.append(lam)
        loss = losses.mean() / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
        per_sample.append(losses.detach())
        recons.append(recon.detach())
        pixel.append(pix.detach())
        perceptual.append(perc.detach())
    scalars = {"rec_loss": torch.cat(pixel).mean()}
    if gan.lpips_weight > 0:
        scalars["lpips"] = torch.cat(perceptual).mean()
    if adversary is not None:
        scalars["gan_g"] = torch.cat(gan_g).mean()
        scalars["adaptive_weight"] = torch.stack(weights).mean()
    return torch.cat(per_sample), recons, scalars


def discriminator_update(disc: TrainState, adversary: Adversary, images: list[torch.Tensor],
                         recons: list[torch.Tensor], settings: StepSettings, gan: GANSettings
                         ) -> tuple[TrainState, torch.Tensor, dict]:
    """The discriminator's hinge-loss gradients over the micro-batches (real images and the
    detached reconstructions in one forward), then its `apply_gradients` at the VAE's schedule
    with base rate gan.disc_lr. Returns its state at step + 1, the finite flag and its metrics."""
    disc.optimizer.zero_grad(set_to_none=True)
    k, scaler = len(images), disc.scaler
    losses, real_means, fake_means = [], [], []
    for i, (real, fake) in enumerate(zip(images, recons)):
        with (contextlib.nullcontext() if i == k - 1 else adversary.no_sync()), autocast(settings):
            logits = adversary.forward(torch.cat([real, fake.to(real.dtype)]))  # (2b, 1, h, w)
        logits_real, logits_fake = logits.float().chunk(2)
        d = hinge_d_loss(logits_real, logits_fake)  # (b,)
        loss = d.mean() / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
        losses.append(d.detach())
        real_means.append(logits_real.detach().mean())
        fake_means.append(logits_fake.detach().mean())
    d_all = torch.cat(losses)
    lr = lr_at(disc.step, gan.disc_lr, settings.warmup_steps, settings.total_steps,
               settings.lr_schedule)
    disc, grad_norm, finite = apply_gradients(disc, lr, 0.0, settings.grad_clip,
                                              loss_finite=finite_everywhere(
                                                  d_all, settings.world_size))
    scalars = {"gan_d": d_all.mean(), "logits_real": torch.stack(real_means).mean(),
               "logits_fake": torch.stack(fake_means).mean(), "disc_grad_norm": grad_norm}
    return disc, finite, scalars
