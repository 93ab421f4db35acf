import json

import pytest

from t2i.config import (
    Config, ConfigError, PRESETS, apply_overrides, config_from_json, get_preset, resolve, to_json,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_round_trips_through_json_exactly(name):
    cfg = get_preset(name)
    assert config_from_json(to_json(cfg)) == cfg
    assert to_json(config_from_json(to_json(cfg))) == to_json(cfg)


def test_overrides_apply_in_order_with_types():
    cfg = apply_overrides(get_preset("tiny"), [
        "unet.base_channels=96", "train.unet_lr=3e-4", "unet.attention_levels=false,true,true",
        "data.subset=1024", "train.compile=true", "unet.base_channels=48",
    ])
    assert cfg.unet.base_channels == 48
    assert cfg.train.unet_lr == 3e-4
    assert cfg.unet.attention_levels == (False, True, True)
    assert cfg.data.subset == "1024"
    assert cfg.train.compile is True
    assert get_preset("tiny").unet.base_channels != 48  # presets are fresh, never mutated


@pytest.mark.parametrize("override, key", [
    ("unet.base_chanels=3", "unet.base_chanels"),
    ("nope.x=1", "nope"),
    ("unet.base_channels=abc", "unet.base_channels"),
    ("train.compile=3", "train.compile"),
    ("unet.channel_mult=1,x", "unet.channel_mult[1]"),
])
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        apply_overrides(get_preset("tiny"), [override])


def test_file_loading_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "small"\n[unet]\nbase_channels = 96\n[train]\nseed = 7\n')
    cfg = resolve("tiny", toml, ["train.seed=8"])
    assert cfg.preset == "small" and cfg.unet.base_channels == 96 and cfg.train.seed == 8
    assert cfg.unet.context_dim == get_preset("small").unet.context_dim  # rest of preset kept
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"vae": {"z_channels": 8, "bogus": 1}}))
    with pytest.raises(ConfigError, match="vae.bogus"):
        resolve("tiny", js)
    with pytest.raises(ConfigError, match="missing.toml"):
        resolve("tiny", tmp_path / "missing.toml")


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        get_preset("huge")


def test_config_is_frozen():
    cfg = Config()
    with pytest.raises(Exception):
        cfg.unet = None  # type: ignore[misc]


@pytest.mark.parametrize("override,message", [
    ("train.snr_floor=-1", "train.snr_floor must be >= 0"),
    ("train.snr_gamma=-0.5", "train.snr_gamma must be >= 0"),
    ("train.snr_floor=6", "above train.snr_gamma"),
    ("schedule.snr_scale=0", "schedule.snr_scale must be positive"),
])
def test_loss_weighting_and_snr_scale_are_checked_when_resolved(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("tiny", None, [override])
    resolve("tiny", None, ["train.snr_floor=0.5", "train.snr_gamma=0", "schedule.snr_scale=0.5"])
