"""Stage 1's adversarial and perceptual terms (t2i/train/gan.py, t2i/models/discriminator.py,
t2i/models/lpips.py): PatchGAN geometry, hinge losses, the adaptive weight, the switch at
vae.disc_start, checkpoints and bitwise resume with the discriminator, metrics, LPIPS files.
(The 2-process gloo run with the GAN term is in test_train_ddp.py.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from t2i.cli.train import main as train_cli
from t2i.config import ConfigError, get_preset
from t2i.models.discriminator import PatchDiscriminator, output_size, receptive_field
from t2i.models.io import WeightsError
from t2i.models.lpips import (FORMAT, LPIPS, TAP_CHANNELS, convert_lpips_weights, load_lpips,
                              save_lpips_weights)
from t2i.train.gan import adaptive_weight, hinge_d_loss, hinge_g_loss, last_layer_grads
from t2i.train import distributed
from helpers import MICRO, assert_bitwise_equal, error_line, invoke, micro_cfg, run_stage

BETAS = "train.vae_betas=0.5,0.8"  # not the tiny preset's (0.9, 0.999)
# a 2-layer PatchGAN (34-pixel patches: 2x2 logits on 16-pixel images), on from step 1 of 4
GAN = ["train.stage=vae", "vae.disc_weight=0.5", "vae.disc_start=1", "vae.disc_layers=2",
       "vae.disc_channels=8", BETAS]
GAN_METRICS = ("rec_loss", "gan_g", "gan_d", "adaptive_weight", "logits_real", "logits_fake")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ----------------------------------------------------------------------------------------------
# Discriminator and losses
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layers,size", [(3, 256), (3, 64), (2, 16), (1, 20)])
def test_patchgan_output_shape(layers, size):
    disc = PatchDiscriminator(channels=8, layers=layers)
    logits = disc(torch.zeros(2, 3, size, size))
    side = output_size(size, layers)
    assert logits.shape == (2, 1, side, side)
    assert (layers, size, side) != (3, 256, None) and output_size(256, 3) == 30  # pix2pix's 30x30


@pytest.mark.parametrize("layers,expected", [(1, 16), (2, 34), (3, 70)])
def test_patchgan_receptive_field(layers, expected):
    """The pixels one logit depends on through the convolutions (the GroupNorms, swapped for
    identities here, add a dependence on the whole image through their statistics)."""
    assert receptive_field(layers) == expected
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=4, layers=layers)
    disc.net = nn.Sequential(*[nn.Identity() if isinstance(m, nn.GroupNorm) else m
                               for m in disc.net])
    x = torch.randn(1, 3, 160, 160, requires_grad=True)
    logits = disc(x)
    c = logits.shape[-1] // 2
    logits[0, 0, c, c].backward()
    rows = x.grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = x.grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == expected
    assert cols.max() - cols.min() + 1 == expected


def test_patchgan_init_follows_pix2pix():
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=64, layers=3)
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in disc.modules() if isinstance(m, nn.GroupNorm)]
    assert len(convs) == 5 and len(norms) == 3
    big = convs[3].weight  # 512 x 256 x 4 x 4 draws
    assert abs(big.mean().item()) < 1e-3 and abs(big.std().item() - 0.02) < 1e-3
    assert all(m.bias is None or not m.bias.any() for m in convs)
    assert all(abs(n.weight.mean().item() - 1.0) < 0.01 and not n.bias.any() for n in norms)


def test_hinge_losses_match_hand_computed_values():
    real = torch.tensor([2.0, 0.5, -1.0, 0.0]).view(1, 1, 2, 2)
    fake = torch.tensor([-2.0, -0.5, 1.0, 3.0]).view(1, 1, 2, 2)
    # relu(1 - real) = 0, 0.5, 2, 1 -> 0.875; relu(1 + fake) = 0, 0.5, 2, 4 -> 1.625
    assert hinge_d_loss(real, fake).tolist() == [0.5 * (0.875 + 1.625)]
    assert hinge_g_loss(fake).tolist() == [-(-2.0 - 0.5 + 1.0 + 3.0) / 4]
    # second sample: relu(1 + real) = 3, 1.5, 0, 1 -> 1.375
    two = hinge_d_loss(torch.cat([real, -real]), torch.cat([fake, fake]))  # per sample
    assert two.shape == (2,) and two[1].item() == 0.5 * (1.375 + 1.625)


def test_adaptive_weight_is_the_ratio_of_last_layer_gradient_norms():
    """float64 on a tiny conv net: the gradients computed independently, by backward into
    `.grad`, one loss at a time."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(4, 3, 3, padding=1)).double()
    disc = PatchDiscriminator(channels=4, layers=1).double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    last = net[2].weight

    def losses():
        recon = net(x)
        return (recon - x).abs().mean(), hinge_g_loss(disc(recon)).mean()

    rec, gan = losses()
    weight = adaptive_weight(*last_layer_grads(rec, gan, last, None, distributed.World()))
    norms = []
    for i in range(2):
        net.zero_grad()
        losses()[i].backward()
        norms.append(math.sqrt(sum(v * v for v in last.grad.flatten().tolist())))
    assert weight.dtype == torch.float64 and not weight.requires_grad
    assert weight.item() == pytest.approx(norms[0] / (norms[1] + 1e-4), rel=1e-12)
    zero = torch.zeros(3)
    assert adaptive_weight(torch.ones(3), zero).item() == 1e4  # clamped, as LDM
    assert adaptive_weight(zero, torch.ones(3)).item() == 0.0


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gan_run(tmp_path_factory) -> Path:
    """4 VAE steps of MICRO with the GAN term on from step 1, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("gan") / "run"
    assert run_stage(micro_cfg(*GAN), out) == 0
    return out


def test_gan_run_writes_the_discriminator_and_its_metrics(gan_run):
    ckpt = gan_run / "vae" / "ckpt-0000004"
    disc = weights(ckpt / "disc.safetensors")
    assert any(k.startswith("net.") for k in disc)
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert "disc.safetensors" in manifest
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert trainer["disc"]["optimizer"]["state"]  # AdamW moments of 3 updates
    assert trainer["disc"]["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.9)
    assert trainer["optimizer"]["param_groups"][0]["betas"] == (0.5, 0.8)  # train.vae_betas
    records = [json.loads(x) for x in (gan_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "gan_g" not in records[0] and "rec_loss" in records[0]  # step 0: before disc_start
    for record in records[1:]:
        assert all(math.isfinite(record[k]) for k in GAN_METRICS), record
        assert record["adaptive_weight"] > 0


def test_gan_resume_is_bitwise_equal_to_uninterrupted(gan_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(gan_run, resumed)
    shutil.rmtree(resumed / "vae" / "ckpt-0000004")  # as if killed right after step 2's save
    (resumed / "vae" / "latest").write_text("ckpt-0000002\n")
    (resumed / "vae.safetensors").unlink()
    assert run_stage(micro_cfg(*GAN), resumed, resume=True) == 0
    for name in ("model.safetensors", "ema.safetensors", "disc.safetensors"):
        assert_bitwise_equal(weights(gan_run / "vae" / "ckpt-0000004" / name),
                             weights(resumed / "vae" / "ckpt-0000004" / name))
    a, b = (torch.load(r / "vae" / "ckpt-0000004" / "trainer.pt", weights_only=True)["disc"]
            for r in (gan_run, resumed))
    for key, state in a["optimizer"]["state"].items():
        assert_bitwise_equal(state, b["optimizer"]["state"][key])


def test_a_resume_takes_betas_and_weight_decay_from_its_config(gan_run, tmp_path):
    """--resume RUN --set train.vae_betas=... / train.weight_decay=...: the optimizer moments
    come from the checkpoint, those settings from the config (not the checkpoint's)."""
    resumed = tmp_path / "resumed"
    shutil.copytree(gan_run, resumed)
    shutil.rmtree(resumed / "vae" / "ckpt-0000004")
    (resumed / "vae" / "latest").write_text("ckpt-0000002\n")
    (resumed / "vae.safetensors").unlink()
    changed = micro_cfg(*GAN, "train.vae_betas=0.6,0.7", "train.weight_decay=0.05")
    assert run_stage(changed, resumed, resume=True) == 0
    trainer = torch.load(resumed / "vae" / "ckpt-0000004" / "trainer.pt", weights_only=True)
    groups = trainer["optimizer"]["param_groups"]
    assert [g["betas"] for g in groups] == [(0.6, 0.7)] * 2
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]  # norms and biases: none
    before = torch.load(gan_run / "vae" / "ckpt-0000002" / "trainer.pt", weights_only=True)
    assert [g["betas"] for g in before["optimizer"]["param_groups"]] == [(0.5, 0.8)] * 2


def test_discriminator_is_off_before_disc_start(tmp_path):
    """disc_start beyond the run: the VAE's update equals the plain (no GAN) run's bitwise and
    the discriminator keeps its initial weights and has no optimizer state."""
    late = micro_cfg(*GAN[:2], "vae.disc_start=100", *GAN[3:])
    plain = micro_cfg("train.stage=vae", BETAS)
    assert run_stage(late, tmp_path / "late") == 0
    assert run_stage(plain, tmp_path / "plain") == 0
    ckpt = tmp_path / "late" / "vae" / "ckpt-0000004"
    for name in ("model.safetensors", "ema.safetensors"):
        assert_bitwise_equal(weights(ckpt / name),
                             weights(tmp_path / "plain" / "vae" / "ckpt-0000004" / name))
    from t2i.train.vae_stage import with_discriminator, build_vae
    from t2i.train.state import init_train_state
    state = init_train_state(build_vae(late, torch.device("cpu")), 1e-3, 0.0, late.train.seed,
                             "fp32", torch.device("cpu"))
    init = with_discriminator(state, late, torch.device("cpu")).disc.model.state_dict()
    assert_bitwise_equal(weights(ckpt / "disc.safetensors"), init)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    assert trainer["disc"]["optimizer"]["state"] == {}
    records = [json.loads(x)
               for x in (tmp_path / "late" / "metrics.jsonl").read_text().splitlines()]
    assert not any("gan_g" in r or "gan_d" in r for r in records)


def test_gan_vae_file_loads_under_a_config_without_the_gan_term(gan_run):
    """Training-only keys never make VAE files incompatible."""
    from t2i.models.vae_files import open_vae
    from t2i.train.vae_stage import load_vae
    load_vae(micro_cfg(), gan_run / "vae.safetensors", torch.device("cpu"))
    assert open_vae(gan_run / "vae.safetensors").cfg.disc_weight == 0.5
    assert set(get_preset("tiny").vae.TRAINING_ONLY) <= set(vars(get_preset("tiny").vae))


def test_resuming_a_gan_run_without_its_discriminator_is_an_error(gan_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(gan_run, resumed)
    ckpt = resumed / "vae" / "ckpt-0000004"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "disc.safetensors").unlink()  # a lost file: damage, so a resume falls back
    from t2i.models.checkpoints import damage
    assert "disc.safetensors is missing" in damage(ckpt)
    del manifest["files"]["disc.safetensors"]  # a checkpoint of a run without the GAN term
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    from t2i.train.checkpoint import load_checkpoint
    from t2i.train.state import init_train_state
    from t2i.train.vae_stage import build_vae, with_discriminator
    cfg = micro_cfg(*GAN)
    state = with_discriminator(init_train_state(build_vae(cfg, torch.device("cpu")), 1e-3, 0.0,
                                                0, "fp32", torch.device("cpu")),
                               cfg, torch.device("cpu"))
    with pytest.raises(WeightsError, match="no discriminator"):
        load_checkpoint(ckpt, state)


def test_presets_switch_the_gan_on_for_photos_only():
    tiny, small, base = (get_preset(p).vae for p in ("tiny", "small", "base"))
    assert tiny.disc_weight == 0 and tiny.lpips_weight == 0  # the CPU demo's numbers stay
    assert get_preset("tiny").train.vae_betas == (0.9, 0.999)
    for vae, train in ((small, get_preset("small").train), (base, get_preset("base").train)):
        assert vae.disc_weight == 0.5 and vae.disc_start == train.vae_steps // 4
        assert vae.lpips_weight == 0  # needs a local weights file
        assert train.vae_betas == (0.5, 0.9)  # LDM's Adam for its GAN autoencoders


def test_disc_layers_too_deep_for_the_resolution_is_a_config_error():
    with pytest.raises(ConfigError, match="vae.disc_layers"):
        micro_cfg("vae.disc_weight=0.5", "vae.disc_layers=3")  # 16 px: no logit left


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------


def random_lpips_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LPIPS()
    for p in model.parameters():
        p.data = torch.rand_like(p) * 0.1 if p.shape[0] == 1 else torch.randn_like(p) * 0.05
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_lpips_file_from_torchvision_and_package_keys(tmp_path):
    """torchvision vgg16 keys (classifier dropped) + the package's `lin{l}.model.1.weight`."""
    ours = random_lpips_tensors()
    torchvision_style = {k: v for k, v in ours.items() if k.startswith("features.")}
    torchvision_style["classifier.0.weight"] = torch.zeros(4, 4)
    package_lins = {f"lin{l}.model.1.weight": ours[f"lin{l}.weight"] for l in range(5)}
    torch.save(torchvision_style, tmp_path / "vgg16.pth")
    out = convert_lpips_weights([tmp_path / "vgg16.pth", package_lins], tmp_path / "lp.safetensors")
    model = load_lpips(out)
    assert_bitwise_equal(model.state_dict(), ours)
    assert [getattr(model, f"lin{l}").weight.shape[1] for l in range(5)] == list(TAP_CHANNELS)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    d = model(x, y)
    assert d.shape == (2,) and (d > 0).all() and model(x, x).abs().max() < 1e-6
    with pytest.raises(WeightsError, match="missing keys"):
        convert_lpips_weights([torchvision_style], tmp_path / "bad.safetensors")
    save_weights_other = tmp_path / "other.safetensors"
    from t2i.models.io import save_weights
    save_weights(save_weights_other, ours, {"format": "something-else"})
    with pytest.raises(WeightsError, match=FORMAT):
        load_lpips(save_weights_other)


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchvision on the package's `pretrained=`
def test_lpips_equals_the_lpips_package(tmp_path):
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    ours = load_lpips(convert_lpips_weights([reference.state_dict()], tmp_path / "lp.safetensors"))
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    expected = reference(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=0, atol=1e-5)
    assert expected.min() > 1e-3  # not a trivially zero distance


def test_lpips_term_trains_and_is_logged(tmp_path):
    path = save_lpips_weights(tmp_path / "lp.safetensors", random_lpips_tensors())
    cfg = micro_cfg("train.stage=vae", "train.vae_steps=2", "vae.lpips_weight=1.0",
                    f"vae.lpips_weights={path}")
    assert run_stage(cfg, tmp_path / "run") == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["lpips"] > 0
        assert record["loss"] > record["rec_loss"]  # the perceptual term is in the loss


def test_lpips_without_its_file_is_one_error_line(tmp_path):
    sets = [a for item in MICRO + ["train.stage=vae", "vae.lpips_weight=1"]
            for a in ("--set", item)]
    result = invoke(train_cli, *sets, "--device", "cpu", "--out", tmp_path / "r1")
    assert result.exit_code == 2
    assert "vae.lpips_weights=PATH" in error_line(result.output)
    missing = tmp_path / "nope.safetensors"
    result = invoke(train_cli, *sets, "--set", f"vae.lpips_weights={missing}", "--device", "cpu",
                    "--out", tmp_path / "r2")
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "nope.safetensors" in line and "convert_lpips_weights" in line
    assert not (tmp_path / "r2").exists()  # a failed first start leaves no folder


def test_gan_settings_from_the_command_line(tmp_path):
    sets = [a for item in MICRO + ["train.stage=vae", "train.vae_steps=2"] for a in ("--set", item)]
    result = invoke(train_cli, *sets, "--set", "vae.disc_weight=0.8", "--set", "vae.disc_start=1",
                    "--set", "vae.disc_layers=2", "--set", "vae.disc_channels=4", "--device", "cpu",
                    "--out", tmp_path / "run", "--log-every", "1")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["vae"]["disc_weight"] == 0.8 and config["vae"]["disc_start"] == 1
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(k in last for k in GAN_METRICS)


# ----------------------------------------------------------------------------------------------
# t2i-eval --suite vae: LPIPS and --resolution
# ----------------------------------------------------------------------------------------------


def test_reconstruction_lpips_is_zero_for_a_perfect_autoencoder_only(tmp_path):
    from test_sharpness import Identity
    from t2i import eval as metrics
    net = load_lpips(save_lpips_weights(tmp_path / "lp.safetensors", random_lpips_tensors()))
    torch.manual_seed(0)
    batches = [torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(1, 3, 16, 16) * 2 - 1]

    class Blurry(Identity):  # reconstructions: a 3x3 box blur of the images
        def decode(self, z):
            return torch.nn.functional.avg_pool2d(z, 3, 1, 1, count_include_pad=False)

    cpu = torch.device("cpu")
    perfect = metrics.reconstruction_metrics(Identity(), batches, cpu, lpips=net)
    blurry = metrics.reconstruction_metrics(Blurry(), batches, cpu, lpips=net)
    assert perfect["lpips"] == 0.0 and "lpips_note" not in perfect
    expected = torch.cat([net(Blurry().decode(x), x) for x in batches]).mean().item()
    assert blurry["lpips"] == pytest.approx(expected, rel=1e-6) and expected > 1e-4
    plain = metrics.reconstruction_metrics(Identity(), batches, cpu)
    assert plain["lpips"] is None and "--lpips-weights" in plain["lpips_note"]


def test_eval_vae_suite_options(gan_run, tmp_path):
    from t2i.cli.eval import main as eval_cli
    from test_vae_import import SMALL, random_autoencoder
    lp = save_lpips_weights(tmp_path / "lp.safetensors", random_lpips_tensors())
    base = [gan_run, "--suite", "vae", "--n", 2, "--device", "cpu"]
    result = invoke(eval_cli, *base, "--resolution", 32, "--lpips-weights", lp)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["resolution"] == 32 and report["lpips"] > 0  # MICRO trains at 16 px
    refusals = {("--resolution", 33): "--resolution 33 is not a multiple of the VAE's "
                                      "downsampling factor 2",
                ("--lpips-weights", tmp_path / "none"): "no such file"}
    for args, message in refusals.items():
        refused = invoke(eval_cli, *base, *args)
        assert refused.exit_code == 2 and message in error_line(refused.output), refused.output
    other = invoke(eval_cli, gan_run, "--suite", "shapes", "--resolution", 32)
    assert other.exit_code == 2 and "for the vae suite only" in error_line(other.output)
    folder = tmp_path / "sd-vae"
    random_autoencoder(seed=1, **SMALL).save_pretrained(folder)
    no_data = invoke(eval_cli, folder, "--suite", "vae", "--device", "cpu")
    assert no_data.exit_code == 2 and "pass --data" in error_line(no_data.output)
