import json

import pytest

import dataclasses

from t2i.config import (
    Config, ConfigError, PRESETS, TextConfig, TrainConfig, UNetConfig, apply_overrides,
    config_from_json, field_rule, get_preset, resolve, to_json, validate,
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
    toml.write_text('preset = "small"\n[unet]\nbase_channels = 120\nnorm_groups = 8\n[train]\nseed = 7\n')
    cfg = resolve("tiny", toml, ["train.seed=8"])
    assert cfg.preset == "small" and cfg.unet.base_channels == 120 and cfg.train.seed == 8
    assert cfg.unet.context_dim == get_preset("small").unet.context_dim  # rest of preset kept
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"vae": {"z_channels": 4, "bogus": 1}}))
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
    ("schedule.snr_scale=0", "schedule.snr_scale must be > 0"),
])
def test_loss_weighting_and_snr_scale_are_checked_when_resolved(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve("tiny", None, [override])
    resolve("tiny", None, ["train.snr_floor=0.5", "train.snr_gamma=0", "schedule.snr_scale=0.5"])


# Every legal-value rule, one bad value each: (override, the key the error must name, its words).
BAD_VALUES = [
    ("schedule.num_train_timesteps=1", "schedule.num_train_timesteps", ">= 2"),
    ("schedule.beta_start=0", "schedule.beta_start", "in (0, 1)"),
    ("schedule.beta_end=1", "schedule.beta_end", "in (0, 1)"),
    ("schedule.beta_schedule=bogus", "schedule.beta_schedule", "one of linear"),
    ("schedule.prediction_type=sample", "schedule.prediction_type", "one of epsilon"),
    ("schedule.snr_scale=-1", "schedule.snr_scale", "> 0"),
    ("vae.in_channels=4", "vae.in_channels", "must be 3"),
    ("vae.base_channels=0", "vae.base_channels", ">= 1"),
    ("vae.channel_mult=1,0", "vae.channel_mult", ">= 1"),
    ("vae.channel_mult=[]", "vae.channel_mult", "not be empty"),
    ("vae.num_res_blocks=-1", "vae.num_res_blocks", ">= 0"),
    ("vae.z_channels=0", "vae.z_channels", ">= 1"),
    ("vae.norm_groups=0", "vae.norm_groups", ">= 1"),
    ("vae.downsample_padding=same", "vae.downsample_padding", "one of symmetric, asymmetric"),
    ("vae.disc_weight=-1", "vae.disc_weight", ">= 0"),
    ("vae.disc_start=-1", "vae.disc_start", ">= 0"),
    ("vae.disc_channels=0", "vae.disc_channels", ">= 1"),
    ("vae.disc_layers=0", "vae.disc_layers", ">= 1"),
    ("vae.disc_lr=-1", "vae.disc_lr", ">= 0"),
    ("vae.lpips_weight=-1", "vae.lpips_weight", ">= 0"),
    ("train.vae_betas=0.5", "train.vae_betas", "two numbers"),
    ("train.vae_betas=0.5,0.9,0.99", "train.vae_betas", "two numbers"),
    ("train.vae_betas=0.5,1", "train.vae_betas", "in [0, 1)"),
    ("unet.in_channels=0", "unet.in_channels", ">= 1"),
    ("unet.out_channels=3", "unet.out_channels", "vae.z_channels"),
    ("unet.base_channels=1", "unet.base_channels", ">= 2"),
    ("unet.channel_mult=1,2,-2", "unet.channel_mult", ">= 1"),
    ("unet.num_res_blocks=-1", "unet.num_res_blocks", ">= 0"),
    ("unet.attention_levels=true", "unet.attention_levels", "entries"),
    ("unet.num_heads=3", "unet.num_heads", "must divide"),
    ("unet.num_heads=0", "unet.num_heads", ">= 1"),
    ("unet.transformer_depth=0", "unet.transformer_depth", ">= 1"),
    ("unet.context_dim=48", "unet.context_dim", "text.width"),
    ("unet.norm_groups=0", "unet.norm_groups", ">= 1"),
    ("unet.time_embed_mult=0", "unet.time_embed_mult", ">= 1"),
    ("unet.freq_shift=16", "unet.freq_shift", "below"),
    ("unet.freq_shift=-1", "unet.freq_shift", ">= 0"),
    ("unet.base_channels=33 unet.num_heads=2", "unet.attention_positions", "divisible by 4"),
    ("text.width=0", "text.width", ">= 1"),
    ("text.layers=-1", "text.layers", ">= 0"),
    ("text.heads=5", "text.heads", "must divide"),
    ("text.embed_dim=-1", "text.embed_dim", ">= 0"),
    ("text.context_length=1", "text.context_length", ">= 2"),
    ("text.vocab_size=1000", "text.vocab_size", "49408"),
    ("text.pretrained=openai", "text.pretrained", "named text.model"),
    ("data.source=", "data.source", "not be empty"),
    ("data.subset=256", "data.subset", "one of 512, 1024"),
    ("data.resolution=30", "data.resolution", "multiple of 16"),
    ("data.resolution=0", "data.resolution", ">= 8"),
    ("data.crop=left", "data.crop", "one of center"),
    ("data.shuffle_buffer=0", "data.shuffle_buffer", ">= 1"),
    ("data.workers=-1", "data.workers", ">= 0"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction", "in [0, 1]"),
    ("data.bad_check_after=-1", "data.bad_check_after", ">= 0"),
    ("data.val_fraction=1", "data.val_fraction", "in [0, 1)"),
    ("train.val_every=-1", "train.val_every", ">= 0"),
    ("train.val_samples=0", "train.val_samples", ">= 1"),
    ("train.val_timesteps=0", "train.val_timesteps", ">= 1"),
    ("train.val_batch_size=0", "train.val_batch_size", ">= 1"),
    ("train.stage=foo", "train.stage", "one of vae, unet, all"),
    ("train.vae_steps=0", "train.vae_steps", ">= 1"),
    ("train.unet_steps=0", "train.unet_steps", ">= 1"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.grad_accum=3", "train.grad_accum", "divisible"),
    ("train.vae_lr=0", "train.vae_lr", "> 0"),
    ("train.unet_lr=-1e-4", "train.unet_lr", "> 0"),
    ("train.warmup_steps=-1", "train.warmup_steps", ">= 0"),
    ("train.lr_schedule=bogus", "train.lr_schedule", "one of cosine, constant"),
    ("train.weight_decay=-0.1", "train.weight_decay", ">= 0"),
    ("train.grad_clip=0", "train.grad_clip", "> 0"),
    ("train.precision=fp8", "train.precision", "one of auto, fp32, bf16, fp16"),
    ("train.ema_decay=2", "train.ema_decay", "in [0, 1]"),
    ("train.cond_drop=1.5", "train.cond_drop", "in [0, 1)"),
    ("train.cond_drop=1", "train.cond_drop", "in [0, 1)"),
    ("train.snr_gamma=-1", "train.snr_gamma", ">= 0"),
    ("train.snr_floor=-0.1", "train.snr_floor", ">= 0"),
    ("train.kl_weight=-1", "train.kl_weight", ">= 0"),
    ("train.recon_loss=l3", "train.recon_loss", "one of l1, mse"),
    ("train.max_nonfinite=0", "train.max_nonfinite", ">= 1"),
    ("train.seed=-1", "train.seed", "in [0, "),
    ("train.sample_every=-1", "train.sample_every", ">= 0"),
    ("train.sample_guidance=-1", "train.sample_guidance", ">= 0"),
    ("train.save_every=-1", "train.save_every", ">= 0"),
    ("train.keep_last=-1", "train.keep_last", ">= 0"),
    ("train.vae_lr=Infinity", "train.vae_lr", "finite"),
    ("train.ema_decay=NaN", "train.ema_decay", "finite"),
    ("unet.freq_shift=-Infinity", "unet.freq_shift", "finite"),
]


@pytest.mark.parametrize("override, key, words", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_every_illegal_value_is_refused_naming_its_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        resolve("tiny", None, override.split())
    assert key in str(err.value) and words in str(err.value), str(err.value)


def test_every_rule_has_a_bad_value_above():
    """The table covers every field that declares a rule (a new field needs a row)."""
    covered = {row[0].split("=")[0] for row in BAD_VALUES}
    for section in ("schedule", "vae", "unet", "text", "data", "train"):
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            if "rule" in f.metadata:
                assert f"{section}.{f.name}" in covered, f"{section}.{f.name}"


@pytest.mark.parametrize("override", [
    "train.cond_drop=0", "train.ema_decay=1", "train.keep_last=0", "train.sample_every=0",
    "train.warmup_steps=0", "unet.num_res_blocks=0", "text.layers=0", "data.resolution=16",
    "schedule.beta_schedule=squaredcos_cap_v2", "train.grad_accum=4", "unet.freq_shift=1",
])
def test_edges_of_the_legal_ranges_are_accepted(override):
    resolve("tiny", None, [override])


def test_combinations_are_checked_after_all_overrides_not_between_them():
    # unet.channel_mult alone would disagree with attention_levels; together they are legal
    cfg = resolve("tiny", None, ["unet.channel_mult=1,2", "unet.attention_levels=false,true"])
    assert cfg.unet.channel_mult == (1, 2)
    cfg = resolve("tiny", None, ["vae.z_channels=8", "unet.in_channels=8", "unet.out_channels=8"])
    assert cfg.unet.in_channels == 8


def test_fields_are_checked_when_a_section_is_built_directly():
    with pytest.raises(ConfigError, match="train.cond_drop"):
        TrainConfig(cond_drop=1.5)
    with pytest.raises(ConfigError, match="text.layers"):
        TextConfig(layers=-1)
    with pytest.raises(ConfigError, match="train.unet_lr.*finite"):
        dataclasses.replace(TrainConfig(), unet_lr=float("inf"))


def test_model_constructors_run_the_same_checks():
    from t2i.models.text import build_text_encoder
    from t2i.models.unet import UNet
    with pytest.raises(ConfigError, match="unet.num_heads"):
        UNet(dataclasses.replace(get_preset("tiny").unet, num_heads=3))
    with pytest.raises(ConfigError, match="text.heads"):
        build_text_encoder(TextConfig(width=32, heads=5, layers=1), device="meta")


def test_files_and_run_configs_are_validated_too(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nema_decay = 2.0\n")
    with pytest.raises(ConfigError, match="train.ema_decay"):
        resolve("tiny", path)
    path.write_text("[train]\nvae_lr = inf\n")  # TOML's own infinity
    with pytest.raises(ConfigError, match="train.vae_lr"):
        resolve("tiny", path)
    bad = json.loads(to_json(get_preset("tiny")))
    bad["data"]["resolution"] = 24
    with pytest.raises(ConfigError, match="data.resolution"):
        config_from_json(json.dumps(bad))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid(name):
    assert validate(get_preset(name)) == get_preset(name)


def test_field_rule_gives_a_key_its_type_and_legal_values():
    kind, rule = field_rule("train.grad_accum")
    assert kind is int and rule.low == 1 and rule.allows(1) and not rule.allows(0)
    kind, rule = field_rule("train.precision")
    assert kind is str and rule.choices == ("auto", "fp32", "bf16", "fp16")
    kind, rule = field_rule("train.cond_drop")
    assert kind is float and rule.allows(0.0) and not rule.allows(1.0)
    assert field_rule("unet.flip_sin_to_cos") == (bool, None)
