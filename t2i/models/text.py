"""Text side: open_clip's BPE tokenizer and its text transformer, returning per-token states for
cross-attention and the pooled (EOT) vector (Radford et al. 2021, sec. 2.4).

Weights, chosen by `TextConfig`:
  * `pretrained="TAG"` with a named `model` (e.g. ViT-L-14 / laion2b_s32b_b82k): downloaded by
    open_clip, or found in its cache; on an offline machine this raises `TextWeightsError` at
    once, saying how to pass a file (text_hub.py);
  * `weights="PATH"`: a local safetensors file or a `torch.load(weights_only=True)` checkpoint
    holding a whole open_clip CLIP state dict (text keys at top level or under `text.`) or just
    the text tower's keys;
  * neither: random init (open_clip's own init), for joint training with the UNet.
A "custom" tower may have `layers=0`: token plus position embeddings and ln_final, so each
token's state depends on that word and its place only (see `TextConfig.layers`).
`frozen=True` sets requires_grad False; callers then run the encoder under `torch.no_grad()`.
Training refuses a frozen tower without weights (`check_text_training`); a run stores its frozen
tower once, as RUN/text.safetensors (frozen_text.py).

State-dict keys are open_clip's own (`token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.N...`, `ln_final.*`, `text_projection`), so open_clip checkpoints load
directly and our saved files load back into open_clip.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from t2i.config import TextConfig, check_text
from t2i.models.io import WeightsError, check_compatible, read_state_dict
from t2i.models.text_hub import TextWeightsError, pretrained_file

# open_clip (and the torchvision it imports, ~5 s of CPU) is imported where it is used, so that
# importing this module, as every command and bench case does, costs nothing until text is needed.
if TYPE_CHECKING:
    from open_clip.model import CLIPTextCfg

_TOWER_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final",
               "text_projection")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """open_clip's BPE tokenizer (vocabulary ships with open_clip, works offline):
    (B, context_length) int64, [SOT, tokens..., EOT, 0...], truncated to fit with EOT kept."""
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length)


def tokenizer(context_length: int) -> Callable[[list[str]], torch.Tensor]:
    """`tokenize` at a fixed length, as a picklable partial (DataLoader workers take it)."""
    return functools.partial(tokenize, context_length=context_length)


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True up to and including the EOT token (EOT has the largest id)."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return positions[None, :] <= tokens.argmax(dim=-1, keepdim=True)


class TextEncoder(nn.Module):
    """open_clip text transformer. `forward(tokens) -> (states, pooled)`: states (B, L, width) are
    the ln_final output for every token (the cross-attention context); pooled (B, output_dim) is
    the state at the EOT token times text_projection."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        # Adopt the tower's submodules under their own names (as open_clip's CLIP does), so our
        # state dict has exactly open_clip's keys.
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer
        self.ln_final = tower.ln_final
        self.text_projection = tower.text_projection
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)  # (L, L) causal
        self.width: int = tower.width
        self.context_length: int = tower.context_length
        self.output_dim: int = tower.output_dim

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.token_embedding(tokens) + self.positional_embedding  # (B, L, W)
        x = self.transformer(x, attn_mask=self.attn_mask)  # causal, batch-first
        states = self.ln_final(x)  # (B, L, W)
        pooled = states[torch.arange(states.shape[0], device=states.device),
                        tokens.argmax(dim=-1)]  # (B, W) at EOT
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        elif self.text_projection is not None:
            pooled = pooled @ self.text_projection  # (B, output_dim)
        return states, pooled


def _tower_config(cfg: TextConfig) -> tuple[int, CLIPTextCfg, bool]:
    """(embed_dim, text config, quick_gelu) for cfg.model; checks the width and length match."""
    import open_clip
    from open_clip.model import CLIPTextCfg

    if cfg.model == "custom":
        text_cfg = CLIPTextCfg(context_length=cfg.context_length, vocab_size=cfg.vocab_size,
                               width=cfg.width, heads=cfg.heads, layers=cfg.layers)
        return cfg.embed_dim or cfg.width, text_cfg, False
    model_cfg = open_clip.get_model_config(cfg.model)
    if model_cfg is None:
        raise TextWeightsError(f"text.model {cfg.model!r} is not an open_clip architecture; use "
                               f"'custom' or one of open_clip.list_models()")
    text_cfg = CLIPTextCfg(**model_cfg["text_cfg"])
    if text_cfg.hf_model_name:
        raise TextWeightsError(f"text.model {cfg.model!r} uses a Hugging Face text tower "
                               f"({text_cfg.hf_model_name}); only open_clip's own transformer "
                               f"is supported")
    if text_cfg.embed_cls or text_cfg.no_causal_mask or text_cfg.pool_type != "argmax":
        raise TextWeightsError(f"text.model {cfg.model!r}: only causal, EOT-pooled (CLIP-style) "
                               f"text towers are supported")
    if text_cfg.width != cfg.width or text_cfg.context_length != cfg.context_length:
        raise TextWeightsError(
            f"text.model {cfg.model!r} has width {text_cfg.width} and context length "
            f"{text_cfg.context_length}, but the config says text.width={cfg.width}, "
            f"text.context_length={cfg.context_length}; make them match (and unet.context_dim)")
    # The activation is not in the weights: OpenAI's tags were trained with QuickGELU, and
    # open_clip builds their towers with it (as here, also when only the architecture is built).
    tag_cfg = open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) if cfg.pretrained else {}
    quick_gelu = bool(model_cfg.get("quick_gelu", False) or (tag_cfg or {}).get("quick_gelu"))
    return model_cfg["embed_dim"], text_cfg, quick_gelu


def pretrained_path(cfg: TextConfig) -> Path:
    """The local file of open_clip's weights for cfg.pretrained: found in the cache, else
    downloaded now, so an offline machine fails at once, before training starts, with how to
    pass a local file (see text_hub.py)."""
    check_text(cfg)  # a custom tower has no pretrained tags
    return pretrained_file(cfg.model, cfg.pretrained)


def text_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text-tower entries of an open_clip state dict, with wrapper prefixes (`module.`,
    `_orig_mod.`) and CustomTextCLIP's `text.` removed; vision and logit keys are dropped."""
    out = {}
    for key, value in state.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if key.startswith("text.") and key.split(".")[1] in _TOWER_KEYS:
            key = key[len("text."):]
        if key.split(".")[0] in _TOWER_KEYS:
            out[key] = value
    return out


def load_text_weights(encoder: TextEncoder, path: str | Path) -> None:
    """Load open_clip-format weights from `path` strictly into `encoder` (clear error naming the
    file and the keys on mismatch)."""
    path = Path(path)
    try:
        state = text_state_dict(read_state_dict(path))
    except WeightsError as err:
        raise TextWeightsError(f"text {err}") from None
    try:
        check_compatible(path, encoder.state_dict(), state)
    except WeightsError as err:
        layers = len(encoder.transformer.resblocks)
        raise TextWeightsError(f"{err} (configured text tower: width {encoder.width}, {layers} "
                               "layers)") from None
    encoder.load_state_dict(state, strict=True)


def build_text_encoder(cfg: TextConfig, device: torch.device | str | None = None,
                       load_weights: bool = True) -> TextEncoder:
    """The configured text encoder, with weights from `cfg.weights` or `cfg.pretrained` (an error,
    never a silent fallback, when they cannot be had). Random init draws from torch's global
    generator: wrap in `t2i.rng.seeded(...)` for reproducible init. `load_weights=False` builds
    the architecture only (e.g. on the meta device for counting)."""
    check_text(cfg)  # the same check as config validation
    embed_dim, text_cfg, quick_gelu = _tower_config(cfg)
    path = None
    if load_weights and cfg.pretrained:
        path = pretrained_path(cfg)
    elif load_weights and cfg.weights:
        path = Path(cfg.weights)
    with torch.device(device or "cpu"):
        encoder = TextEncoder(build_tower(embed_dim, text_cfg, quick_gelu))
    if path is not None:
        load_text_weights(encoder, path)
    if cfg.frozen:
        encoder.requires_grad_(False)
    return encoder


def build_tower(embed_dim: int, text_cfg: CLIPTextCfg, quick_gelu: bool) -> nn.Module:
    """open_clip's text tower. With `layers=0` it keeps no transformer block; open_clip's init
    divides by the layer count, so one block is built and dropped."""
    from open_clip.model import _build_text_tower

    if text_cfg.layers > 0:
        return _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
    tower = _build_text_tower(embed_dim, dataclasses.replace(text_cfg, layers=1),
                              quick_gelu=quick_gelu)
    tower.transformer.resblocks = nn.ModuleList()  # (B, L, W) passes through unchanged
    return tower


@torch.no_grad()
def empty_prompt_states(encoder: TextEncoder, device: torch.device | str | None = None
                        ) -> torch.Tensor:
    """(1, L, width) states of the empty prompt "": the unconditional input of classifier-free
    guidance (Ho & Salimans 2022). Expand to the batch with `.expand(B, -1, -1)`."""
    device = device or encoder.positional_embedding.device
    tokens = tokenize([""], encoder.context_length).to(device)
    return encoder(tokens)[0]
