"""TrainState: the frozen container a training step maps to its successor.

`TrainState` holds the trained module (its parameters), the EMA parameters, the optimizer (and
its state), the optional fp16 GradScaler, the step and the seed. `train_step(state, batch)`
returns a new TrainState with `step + 1`; the parameters, EMA tensors and optimizer buffers are
updated in place inside the step (the one allowed mutation, see DESIGN.md section 3).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TrainState:
    model: nn.Module  # trained parameters (the VAE, or ModuleDict(unet=..., text=...))
    ema: dict[str, torch.Tensor]  # name -> EMA copy of each trainable parameter
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step: int
    seed: int

    def next(self) -> "TrainState":
        return dataclasses.replace(self, step=self.step + 1)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that the optimizer updates, by clean (prefix-free) name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused where the device supports it (the fused kernel also skips a step without a
    host sync when given a `found_inf` flag, see step.py)."""
    params = list(trainable(model).values())
    decay = [p for p in params if p.ndim >= 2]  # no weight decay on norms and biases
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, ValueError):  # fused kernel missing for this device/dtype
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), foreach=True)


def init_train_state(model: nn.Module, lr: float, weight_decay: float, seed: int,
                     precision: str, device: torch.device) -> TrainState:
    ema = {name: p.detach().clone() for name, p in trainable(model).items()}
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return TrainState(model=model, ema=ema, optimizer=make_optimizer(model, lr, weight_decay, device),
                      scaler=scaler, step=0, seed=seed)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: (1 + step) / (10 + step), capped at `decay`, so early EMA tracks the model."""
    return min(decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place (a free function, one fused call)."""
    names = list(ema)
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
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()
    return [name for name, ok in zip(tensors, finite) if not ok]
