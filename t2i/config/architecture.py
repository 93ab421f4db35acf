"""Which fields of the model sections decide what a model computes from its weights.

Weights fit a config when their tensors match by name and shape, but that misses fields that
change the output without changing a shape: unet.norm_groups, unet.num_heads,
unet.flip_sin_to_cos, unet.freq_shift, vae.norm_groups, vae.downsample_padding, ... Weights
loaded under another value of one of them run without error and compute something else (a
parent's UNet under another unet.norm_groups predicts noise 28% off). Every place that puts
stored weights under a config (resume, --init-from, stage 2's VAE file, sampling) compares the
architecture fields with `architecture_changes` first.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

from t2i.config.sections import Config, VAEConfig

# fields of each model section that never change what the model computes from its weights:
# memory layout, recomputation, the stage-1 training terms, where the text weights come from
NOT_ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "vae": ("channels_last", *VAEConfig.TRAINING_ONLY),
    "unet": ("channels_last", "gradient_checkpointing"),
    "text": ("pretrained", "weights", "frozen"),
}


# fields whose 0 stands for another field's value: compared by the value they stand for
EFFECTIVE: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("text", "embed_dim"): lambda text: text.embed_dim or text.width,
}


def architecture_changes(before: Config, after: Config, sections: Iterable[str]
                         ) -> list[str]:
    """"section.field BEFORE (now AFTER)" for each architecture field of `sections` ("vae",
    "unet", "text") whose value differs between the two configs, in field order."""
    changes = []
    for section in sections:
        was, now = getattr(before, section), getattr(after, section)
        for f in dataclasses.fields(was):
            if f.name in NOT_ARCHITECTURE[section]:
                continue
            value = EFFECTIVE.get((section, f.name), lambda part, name=f.name: getattr(part, name))
            if value(was) != value(now):
                changes.append(f"{section}.{f.name} {shown(getattr(was, f.name))} "
                               f"(now {shown(getattr(now, f.name))})")
    return changes


def shown(value: object) -> str:
    """A config value as a --set would write it (true/false, tuples as [a, b])."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    return str(value)


def listed(changes: list[str], limit: int = 3) -> str:
    """The first `limit` changes, comma separated, with ", ..." when there are more."""
    return ", ".join(changes[:limit]) + (", ..." if len(changes) > limit else "")
