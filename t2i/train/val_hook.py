"""The validation loss during stage 2: the hook `fit` calls every `train.val_every` steps.

The set is built once, when the stage starts (t2i/validation.py: fixed samples, noise and
timestep grid). Each call loads the EMA weights into a copy of the model that the hook owns
(one more copy of the weights in memory; the trained module is never touched) and returns the
metrics record that `fit` writes to metrics.jsonl and TensorBoard. The main rank alone
evaluates; `t2i-eval RUN --suite val-loss` gives the same number for the checkpoint of that
step.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

from torch import nn

from t2i.config import Config
from t2i.models.vae_files import vae_sha256
from t2i.train.env import Env
from t2i.train.state import TrainState, ema_state_dict
from t2i.validation import build_val_set, val_loss


def validation_hook(cfg: Config, state: TrainState, vae: nn.Module, env: Env,
                    text: nn.Module | None = None, vae_path: Path | None = None
                    ) -> Callable[[TrainState], dict[str, Any]] | None:
    """`validate(state) -> metrics record` for `fit`'s on_validate, or None when
    train.val_every is 0 or this is not the main rank. Builds the set now, so missing held-out
    data fails the start (DataError), not the first validation. `text`: the frozen text tower,
    which is not part of `state.model` (it has no EMA; see unet_stage.trained_modules).
    `vae_path`: the run's VAE, which held-out latent shards must have been encoded with
    (compared by vae_files.vae_sha256, hashed only when validation runs)."""
    if not cfg.train.val_every or not env.world.is_main:
        return None
    identity = vae_sha256(vae_path) if vae_path is not None else None
    val_set = build_val_set(cfg, vae, env.device, vae_identity=identity)
    ema_model = copy.deepcopy(state.model).requires_grad_(False)  # the hook's own copy

    def validate(current: TrainState) -> dict[str, Any]:
        ema_model.load_state_dict(ema_state_dict(current))  # in place: the hook's copy only
        tower = ema_model["text"] if "text" in ema_model else text
        result = val_loss(ema_model["unet"], tower, val_set, cfg, env.device)
        return {"stage": "unet", "step": current.step, "kind": "val", **result,
                "time": time.time()}

    return validate
