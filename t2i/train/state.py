"""TrainState, and `apply_gradients`: the one function that updates it.

`TrainState` is a frozen container of the trained module (its parameters), the EMA copies of
its trainable parameters, the optimizer (AdamW and its moments), the optional fp16 GradScaler,
the step and the seed. PyTorch updates parameters and optimizer state in place, and so does
t2i, but only at the places named here (see ../../shared/DESIGN.md section 3).

What one training step (`step.py`) changes in place, in order:
- gradients (`.grad` of every trainable parameter): set to None, then summed over the
  micro-batches by backward (all-reduced by DDP on the last one), in
  `step.accumulate_gradients`; unscaled (fp16) and clipped to `grad_clip` in `apply_gradients`.
  They are left in place after the step and cleared at the next one. (Under DDP the forward
  also copies rank 0's buffers, the VAE's latent_scale and the text attention mask, over every
  rank's: the same values.)
- the GradScaler (fp16 only): its scale tensor is created at the first `scale` call
  (`accumulate_gradients`); `unscale_`, `step` and `update` in `apply_gradients` record the
  per-step inf check and grow or back off the scale and its growth tracker.
- the optimizer's learning rate: `apply_gradients` writes the `lr` it is given (computed by the
  caller from the step with `lr_at`) into every param group before the update.
- the parameters and the optimizer state (AdamW's exp_avg, exp_avg_sq and its per-parameter
  step counter): `optimizer.step()` in `apply_gradients`, skipped on the device when the step
  is not finite (the fused kernel reads `optimizer.found_inf`, which `apply_gradients` sets for
  that one call and resets to None; under fp16 the GradScaler passes its own flag the same
  way; the foreach fallback reads the flag on the host).
- the EMA weights: `ema_update` inside `apply_gradients`, with the decay the caller computed
  from the step (`ema_decay_at`, no warm-up after --init-from); it runs on skipped steps too (it then moves toward the same
  unchanged parameters).
- the latent cache (stage 2 with `--cache-latents`): the step's `encode` adds the posterior
  moments of keys it has not seen and counts hits and misses (`LatentCache.moments`, through
  `unet_stage.latent_encoder`).
- stage 1 with a GAN term (t2i/train/gan.py): the VAE state's `disc` is a second TrainState
  (the PatchGAN, no EMA, its own AdamW and GradScaler) that `gan.vae_gan_train_step` updates
  with its own `apply_gradients` call after the VAE's, once the step reaches vae.disc_start:
  the discriminator's gradients (set to None, then accumulated), its scaler, lr, parameters
  and AdamW moments, exactly as listed above for the trained model. Before disc_start, nothing
  of it changes. The adaptive weight's `torch.autograd.grad` calls change nothing (they return
  gradients instead of accumulating them), and the generator's pass reads the discriminator
  through detached parameters, so no gradient reaches the discriminator there.
- the step counter: not in place. `apply_gradients` returns a new TrainState with `step + 1`
  that shares the (updated) module, EMA tensors, optimizer and scaler with the one it was
  given; the old state is spent and must not be stepped again.

Outside the step, `load_checkpoint` (checkpoint.py) restores the parameters, EMA tensors,
optimizer and scaler state in place (and those of `disc`, the discriminator);
`initialize_from_parent` (init_from.py, `--init-from`) copies a parent's parameters and EMA
tensors in place at step 0, leaving the optimizer fresh; the loop
(loop.py) advances the data iterator and keeps its own non-finite counters. Nothing in
training leaves torch's global RNG changed: every draw of a step comes from a generator
derived from (seed, purpose, step), and module init draws inside `rng.seeded`, which restores
the global generator afterwards (see t2i/rng.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainState:
    """What a run trains and everything needed to continue it exactly (all of it goes into a
    checkpoint). Frozen: only `apply_gradients` and `load_checkpoint` change what its fields
    hold, in place, as the module docstring lists."""

    model: nn.Module  # trained parameters (the VAE, or ModuleDict(unet=..., text=...))
    ema: dict[str, torch.Tensor]  # name -> EMA copy of each trainable parameter
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int
    seed: int
    # stage 1 with a GAN term: the discriminator's own state (empty EMA, same step and seed)
    disc: "TrainState | None" = None


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that the optimizer updates, by clean (prefix-free) name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, device: torch.device,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (the fused kernel also skips a step without a
    host sync when given a `found_inf` flag, see apply_gradients)."""
    params = list(trainable(model).values())
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # fused kernel missing for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)


def init_train_state(model: nn.Module, lr: float, weight_decay: float, seed: int,
                     precision: str, device: torch.device,
                     betas: tuple[float, float] = (0.9, 0.999)) -> TrainState:
    """A fresh TrainState: EMA = the trainable weights, AdamW with `betas`, step 0."""
    ema = {name: p.detach().clone() for name, p in trainable(model).items()}
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainState(model=model, ema=ema, scaler=scaler, step=0, seed=seed,
                      optimizer=make_optimizer(model, lr, weight_decay, device, betas=betas))


def init_disc_state(disc: nn.Module, lr: float, weight_decay: float, seed: int, precision: str,
                    device: torch.device) -> TrainState:
    """The discriminator's TrainState: AdamW with betas (0.5, 0.9) as in VQGAN / LDM, no EMA,
    its own GradScaler under fp16 (its loss scale is not the VAE's)."""
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainState(model=disc, ema={}, scaler=scaler, step=0, seed=seed,
                      optimizer=make_optimizer(disc, lr, weight_decay, device, betas=(0.5, 0.9)))


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """EMA warm-up: (1 + step) / (10 + step), capped at `decay`, so the EMA of a model trained
    from random weights soon forgets them. `warmup` False: `decay` from step 0, for an EMA that
    is already an average (a run started with --init-from copies its parent's; the warm-up
    would replace it with the raw weights within a few steps, as LDM's LitEma, whose update
    count a checkpoint carries, does not)."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place (a free function, one fused call)."""
    names = list(ema)
    if not names:  # a state without EMA (the discriminator's)
        return
    torch._foreach_lerp_([ema[n] for n in names], [params[n].detach() for n in names], 1.0 - decay)


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str) -> float:
    """Linear warm-up over `warmup` steps, then constant or cosine decay to 10% of base."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ema_state_dict(state: TrainState) -> dict[str, torch.Tensor]:
    """The model's full state dict with every trainable parameter replaced by its EMA value."""
    out = dict(state.model.state_dict())
    out.update({name: value for name, value in state.ema.items()})
    return out


@torch.no_grad()
def nonfinite_weights(state: TrainState) -> list[str]:
    """Names of the model's floating-point tensors (parameters and buffers) and EMA tensors
    ("ema." + name) that hold NaN or inf; empty when all are finite. One host sync."""
    tensors = {name: t for name, t in state.model.state_dict().items() if t.is_floating_point()}
    tensors.update({f"ema.{name}": t for name, t in state.ema.items()})
    if state.disc is not None:
        tensors.update({f"disc.{name}": t for name, t in state.disc.model.state_dict().items()
                        if t.is_floating_point()})
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite) if not ok]


def apply_gradients(state: TrainState, lr: float, ema_decay: float, grad_clip: float,
                    loss_finite: torch.Tensor) -> tuple[TrainState, torch.Tensor, torch.Tensor]:
    """The update of one step, once the gradients are accumulated: unscale them (fp16), clip
    their global norm to `grad_clip`, then, unless the loss (`loss_finite`, a device bool) or
    the gradient norm is not finite, AdamW at learning rate `lr`; then the EMA at `ema_decay`.

    Returns (the state at step + 1, the gradient norm before clipping, the finite flag), the two
    tensors on the device: no host sync with the fused optimizer. Changes in place exactly what
    this module's docstring lists (gradients, scaler, lr, parameters, optimizer state, EMA)."""
    opt, scaler = state.optimizer, state.scaler
    params = trainable(state.model)
    if scaler is not None:
        scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), grad_clip, foreach=True)
    finite = loss_finite & torch.isfinite(grad_norm)
    for group in opt.param_groups:
        group["lr"] = lr
    step_unless_nonfinite(opt, scaler, finite)
    # EMA of unchanged weights after a skipped step is harmless: it moves toward the same params.
    ema_update(state.ema, params, ema_decay)
    return dataclasses.replace(state, step=state.step + 1), grad_norm, finite


def step_unless_nonfinite(opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                          finite: torch.Tensor) -> None:
    """`opt.step()` unless `finite` is False, without reading the flag on the host when the
    optimizer is fused (the kernel takes `found_inf`). The foreach fallback must sync."""
    if scaler is not None:  # fp16: the scaler already skips on inf/nan gradients
        scaler.step(opt)
        scaler.update()
        return
    if all(group.get("fused") for group in opt.param_groups):
        opt.found_inf = (~finite).to(torch.float32)  # read by torch.optim.AdamW(fused=True)
        try:
            opt.step()
        finally:
            opt.found_inf = None
    elif bool(finite):  # host sync, only on devices without the fused kernel
        opt.step()
