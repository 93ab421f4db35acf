"""Text side: tokenizer, padding mask, encoder outputs, open_clip-format weights (made here),
pretrained-tag errors, freezing, the empty-prompt states."""

from __future__ import annotations

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from t2i import rng
from t2i.config import ConfigError, TextConfig
from t2i.models.text import (TextWeightsError, build_text_encoder, empty_prompt_states,
                             padding_mask, text_state_dict, tokenize)

SOT, EOT = 49406, 49407
SMALL = dict(model="custom", width=32, layers=2, heads=4, embed_dim=16, frozen=False)


def small_clip() -> open_clip.CLIP:
    """A real open_clip CLIP model with a tiny vision tower and a text tower like SMALL."""
    with rng.seeded(0, "clip"):
        return open_clip.CLIP(embed_dim=16,
                              vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, patch_size=8,
                                                                 image_size=16, head_width=16),
                              text_cfg=open_clip.CLIPTextCfg(width=32, layers=2, heads=4))


def test_tokenize_and_padding_mask():
    tokens = tokenize(["a red circle", ""])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == SOT and tokens[1, :2].tolist() == [SOT, EOT]
    eot = tokens[0].tolist().index(EOT)
    mask = padding_mask(tokens)
    assert mask.dtype == torch.bool and mask.shape == (2, 77)
    assert mask[0, : eot + 1].all() and not mask[0, eot + 1:].any()
    assert mask[1].sum() == 2
    long = tokenize(["word " * 200])
    assert long[0, -1] == EOT and padding_mask(long).all()


def test_encoder_shapes_and_pooling():
    with rng.seeded(0, "text"):
        enc = build_text_encoder(TextConfig(**SMALL))
    tokens = tokenize(["a red circle", "two blue squares"])
    states, pooled = enc(tokens)
    assert enc.width == 32 and states.shape == (2, 77, 32) and pooled.shape == (2, 16)
    eot = tokens.argmax(-1)
    assert torch.allclose(pooled, states[torch.arange(2), eot] @ enc.text_projection)
    assert all(p.requires_grad for p in enc.parameters())
    assert sorted(enc.state_dict())[:3] == ["ln_final.bias", "ln_final.weight",
                                            "positional_embedding"]


@pytest.mark.parametrize("fmt", ["safetensors", "pt-full", "pt-custom-text"])
def test_open_clip_weights_file_loads(tmp_path, fmt):
    clip = small_clip()
    state = clip.state_dict()
    assert "visual.conv1.weight" in state and "token_embedding.weight" in state
    if fmt == "safetensors":
        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "pt-full":  # a training checkpoint: {"state_dict": {"module.<key>": ...}}
        path = tmp_path / "clip.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:  # CustomTextCLIP layout, text tower under "text."
        path = tmp_path / "text.pt"
        torch.save({f"text.{k}": v for k, v in text_state_dict(state).items()}, path)
    with rng.seeded(1, "random"):
        random_enc = build_text_encoder(TextConfig(**SMALL))
    enc = build_text_encoder(TextConfig(**SMALL, weights=str(path)))
    tokens = tokenize(["a red circle", "a green triangle at the top"])
    with torch.no_grad():
        states, pooled = enc(tokens)
        reference = clip.encode_text(tokens)  # open_clip's own forward (pooled, projected)
        assert torch.allclose(pooled, reference, atol=1e-5)
        assert (random_enc(tokens)[0] - states).abs().max() > 1e-3


def test_mismatched_or_missing_weights_are_clear(tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in small_clip().state_dict().items()}, str(path))
    with pytest.raises(TextWeightsError, match=r"clip\.safetensors.*shape mismatch"):
        build_text_encoder(TextConfig(**{**SMALL, "width": 64}, weights=str(path)))
    with pytest.raises(TextWeightsError, match="missing"):
        build_text_encoder(TextConfig(**{**SMALL, "layers": 3}, weights=str(path)))
    with pytest.raises(TextWeightsError, match="does not exist"):
        build_text_encoder(TextConfig(**SMALL, weights=str(tmp_path / "nope.pt")))


def test_offline_pretrained_tag_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    cfg = TextConfig(model="ViT-B-32", pretrained="laion2b_s34b_b79k", width=512, layers=12,
                     heads=8)
    with pytest.raises(TextWeightsError, match=r"text\.weights=PATH"):
        build_text_encoder(cfg)
    with pytest.raises(TextWeightsError, match="known tags"):
        build_text_encoder(TextConfig(model="ViT-B-32", pretrained="no_such_tag", width=512))


def test_named_architecture_and_width_check():
    cfg = TextConfig(model="ViT-B-32", width=512, layers=12, heads=8)
    enc = build_text_encoder(cfg, device="meta", load_weights=False)
    assert enc.width == 512 and len(enc.transformer.resblocks) == 12
    with pytest.raises(TextWeightsError, match="text.width"):
        build_text_encoder(TextConfig(model="ViT-B-32", width=768), device="meta")
    with pytest.raises(TextWeightsError, match="not an open_clip architecture"):
        build_text_encoder(TextConfig(model="no-such-model"), device="meta")


def test_zero_layer_tower_keeps_each_word_independent():
    """layers=0: a token's state is LayerNorm(word + place), so a word's state does not change
    when an earlier word does (a causal block would change it), and the weights round-trip."""
    cfg = TextConfig(**{**SMALL, "layers": 0})
    with rng.seeded(0, "text"):
        enc = build_text_encoder(cfg)
    assert len(enc.transformer.resblocks) == 0
    assert not any(k.startswith("transformer.") for k in enc.state_dict())
    tokens = tokenize(["a green square", "a red square"])  # differ at token 2 only
    with torch.no_grad():
        states, _ = enc(tokens)
        expected = enc.ln_final(enc.token_embedding(tokens) + enc.positional_embedding)
    assert torch.equal(states, expected)
    assert torch.equal(states[0, 3:], states[1, 3:]) and not torch.equal(states[0, 2], states[1, 2])
    with rng.seeded(0, "text"):
        deep = build_text_encoder(TextConfig(**SMALL))  # the same words through 2 causal blocks
    with torch.no_grad():
        mixed, _ = deep(tokens)
    assert not torch.allclose(mixed[0, 3], mixed[1, 3])
    again = build_text_encoder(cfg)
    again.load_state_dict(enc.state_dict())
    with torch.no_grad():
        assert torch.equal(again(tokens)[0], states)
    with pytest.raises(ConfigError, match="text.layers"):
        TextConfig(layers=-1)


def test_frozen_and_empty_prompt():
    enc = build_text_encoder(TextConfig(**{**SMALL, "frozen": True}))
    assert not any(p.requires_grad for p in enc.parameters())
    empty = empty_prompt_states(enc)
    assert empty.shape == (1, 77, 32) and not empty.requires_grad
    with torch.no_grad():
        assert torch.equal(empty, enc(tokenize([""]))[0])
