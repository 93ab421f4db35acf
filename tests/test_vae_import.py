"""Stable Diffusion VAEs imported as t2i VAEs (t2i.models.vae_import): a diffusers AutoencoderKL
folder and an LDM single file compute what diffusers' own model computes; the 1x1 fold is
exact; `t2i-data convert-vae`, stage 2 and t2i-sample on an imported VAE; bad inputs are one
`Error:` line naming the file. diffusers is the test-only reference (the package never
imports it); the LDM key names are checked against diffusers' own LDM converter."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from t2i.cli.data import main as data_cli
from t2i.cli.eval import main as eval_cli
from t2i.cli.sample import main as sample_cli
from t2i.cli.train import main as train_cli
from t2i.models.io import load_weights, read_metadata, save_weights
from t2i.models.vae_files import open_vae, vae_sha256
from t2i.models.vae_import import SD_SCALING_FACTOR, fold_pointwise, import_vae
from helpers import MICRO, error_line, invoke

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             latent_channels=4, sample_size=32)
# LDM hard-codes 32 groups, so an LDM file can only hold a 32-group VAE
SMALL_LDM = {**SMALL, "norm_num_groups": 32}
SD1 = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
           latent_channels=4, sample_size=64)
TOLERANCE = dict(rtol=1e-5, atol=1e-5)  # float32 on the CPU
# At SD-1 size float32 rounding alone exceeds 1e-5: diffusers' own float32 decode is 1.24e-5
# from its float64 decode (t2i vs diffusers measured 1.07e-5 mean, 8.0e-6 logvar, 1.83e-5
# decode); 5e-5 leaves room for other CPUs' kernels, far below any mapping error (~1)
SD1_TOLERANCE = dict(rtol=1e-5, atol=5e-5)


def random_autoencoder(seed: int = 0, **config) -> diffusers.AutoencoderKL:
    """A diffusers AutoencoderKL whose every parameter is drawn from `seed` (norm scales and
    biases too, so a dropped or swapped tensor shows), eval mode, float32."""
    levels = len(config["block_out_channels"])
    with torch.random.fork_rng():  # its own init draws leave the global generator alone
        model = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                        up_block_types=("UpDecoderBlock2D",) * levels, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:  # variance-preserving: activations stay O(1) through the network
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(0.75 + 0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def saved(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


def assert_same_function(ours, theirs, size: int = 32, seed: int = 1,
                         tolerance: dict = TOLERANCE) -> None:
    """encode (mean, logvar) and decode agree on random inputs within `tolerance`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 if size <= 32 else 1, 3, size, size, generator=g) * 2 - 1  # (B, 3, H, W)
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        z = torch.randn(post.mean.shape, generator=g)  # (B, z, h, w)
        decoded, expected = ours.decode(z), theirs.decode(z).sample
    torch.testing.assert_close(post.mean, ref.mean, **tolerance)
    torch.testing.assert_close(post.logvar, ref.logvar, **tolerance)
    torch.testing.assert_close(decoded, expected, **tolerance)


def ldm_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors under the original LDM names. Test-only; its correctness is checked
    against diffusers' own LDM -> diffusers converter in the tests that use it."""
    levels = len(model.config.block_out_channels)
    renames = [(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
               (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
               (r"mid_block\.resnets\.0\.", "mid.block_1."), (r"mid_block\.resnets\.1\.", "mid.block_2."),
               (r"mid_block\.attentions\.0\.group_norm\.", "mid.attn_1.norm."),
               (r"mid_block\.attentions\.0\.to_(q|k|v)\.", r"mid.attn_1.\1."),
               (r"mid_block\.attentions\.0\.to_out\.0\.", "mid.attn_1.proj_out."),
               ("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out")]
    out = {}
    for key, tensor in model.state_dict().items():
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}."
                               f"{'block' if m[2] == 'resnets' else 'upsample'}.", key)
        for pattern, repl in renames:
            key = re.sub(pattern, repl, key)
        conv_attention = ".attn_1." in key and key.endswith("weight") and tensor.ndim == 2
        out[key] = tensor[:, :, None, None] if conv_attention else tensor  # LDM: 1x1 convs
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(diffusers model, its save_pretrained folder) of the SMALL config."""
    model = random_autoencoder(**SMALL)
    return model, saved(model, tmp_path_factory.mktemp("small") / "vae")


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    """(diffusers model, its folder, a whole-checkpoint .safetensors holding its LDM tensors
    under first_stage_model. beside a UNet tensor)."""
    model = random_autoencoder(seed=3, **SMALL_LDM)
    root = tmp_path_factory.mktemp("ldm")
    checkpoint = {f"first_stage_model.{k}": v.contiguous() for k, v in ldm_state(model).items()}
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 4, 3, 3)
    save_weights(root / "sd.safetensors", checkpoint)
    return model, saved(model, root / "diffusers"), root / "sd.safetensors"


@pytest.mark.parametrize("config", [
    SMALL,
    dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4,
         latent_channels=3, use_quant_conv=False, use_post_quant_conv=False,
         mid_block_add_attention=False, scaling_factor=0.13025),
], ids=["quant-convs", "sdxl-scale-no-quant-no-attention"])
def test_diffusers_folder_computes_what_diffusers_computes(config, tmp_path):
    model = random_autoencoder(**config)
    vae = import_vae(saved(model, tmp_path / "vae"))
    assert_same_function(vae, model)
    assert vae.latent_scale.item() == pytest.approx(config.get("scaling_factor", 0.18215))
    widths = [vae.cfg.base_channels * m for m in vae.cfg.channel_mult]
    assert widths == list(config["block_out_channels"])
    assert vae.cfg.post_quant_conv == config.get("use_post_quant_conv", True)
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training


def test_ldm_file_matches_diffusers_single_file_loader(ldm, tmp_path):
    model, folder, checkpoint = ldm
    tensors = ldm_state(model)
    back = convert_ldm_vae_checkpoint(tensors, dict(model.config))  # diffusers' own mapping
    reference = model.state_dict()
    assert back.keys() == reference.keys()
    assert all(torch.equal(back[k], reference[k]) for k in reference)
    theirs = diffusers.AutoencoderKL.from_single_file(str(checkpoint), config=str(folder),
                                                      local_files_only=True).eval()
    ours = import_vae(checkpoint)
    assert ours.latent_scale.item() == pytest.approx(SD_SCALING_FACTOR)
    assert_same_function(ours, theirs)
    # the same model in the diffusers layout, and as a bare .ckpt pickle, import identically
    pickle = tmp_path / "vae.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, pickle)
    for other in (import_vae(folder), import_vae(pickle)):
        assert all(torch.equal(other.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_sd1_sized_vae_matches_at_64px(tmp_path):
    model = random_autoencoder(seed=5, **SD1)
    vae = import_vae(saved(model, tmp_path / "sd1"))
    assert vae.cfg.channel_mult == (1, 2, 4, 4) and vae.cfg.num_res_blocks == 2
    assert_same_function(vae, model, size=64, tolerance=SD1_TOLERANCE)


def test_fold_of_a_pointwise_conv_after_a_3x3_conv_is_exact():
    g = torch.Generator().manual_seed(0)
    w3, b3 = torch.randn(6, 5, 3, 3, generator=g), torch.randn(6, generator=g)
    w1, b1 = torch.randn(4, 6, 1, 1, generator=g), torch.randn(4, generator=g)
    x = torch.randn(2, 5, 9, 7, generator=g, dtype=torch.float64)
    two = F.conv2d(F.conv2d(x, w3.double(), b3.double(), padding=1), w1.double(), b1.double())
    w, b = fold_pointwise(w3, b3, w1, b1)
    torch.testing.assert_close(F.conv2d(x.float(), w, b, padding=1), two.float(),
                               rtol=1e-5, atol=1e-5)


def test_a_pointwise_conv_before_a_padded_3x3_conv_folds_only_inside_the_border():
    """Why SD's post_quant_conv (1x1, then the decoder's conv_in) stays a layer: conv_in
    zero-pads the 1x1's output, so the 1x1's bias reaches border pixels through fewer taps
    than the folded bias would."""
    g = torch.Generator().manual_seed(1)
    wp, bp = torch.randn(6, 4, 1, 1, generator=g), torch.randn(6, generator=g)  # 1x1: 4 -> 6
    wc, bc = torch.randn(5, 6, 3, 3, generator=g), torch.randn(5, generator=g)  # 3x3: 6 -> 5
    z = torch.randn(2, 4, 9, 7, generator=g)
    before = F.conv2d(F.conv2d(z, wp, bp), wc, bc, padding=1)
    folded = F.conv2d(z, torch.einsum("omhw,mc->ochw", wc, wp[:, :, 0, 0]),
                      bc + torch.einsum("omhw,m->o", wc, bp), padding=1)
    torch.testing.assert_close(folded[..., 1:-1, 1:-1], before[..., 1:-1, 1:-1],
                               rtol=1e-5, atol=1e-5)
    assert (folded - before).abs().amax(dim=(0, 1))[0].min() > 1e-3  # every top-row pixel


def test_convert_vae_writes_a_file_every_t2i_tool_reads(small, ldm, tmp_path):
    model, folder = small
    out = tmp_path / "vae.safetensors"
    result = invoke(data_cli, "convert-vae", folder, out)
    assert result.exit_code == 0, result.output
    assert "z_channels 4" in result.output and "latent_scale 0.18215" in result.output
    converted = open_vae(out)
    assert_same_function(converted, model)
    assert converted.cfg == import_vae(folder).cfg
    metadata = read_metadata(out)
    assert metadata["stage"] == "import" and metadata["import_layout"] == "diffusers"
    assert vae_sha256(out) == vae_sha256(folder) == metadata["source_sha256"]
    again = invoke(data_cli, "convert-vae", folder, out)
    assert again.exit_code == 2 and "--overwrite" in error_line(again.output)
    scaled = invoke(data_cli, "convert-vae", ldm[2], out, "--scaling-factor", 0.13025,
                    "--overwrite")
    assert scaled.exit_code == 0, scaled.output
    assert load_weights(out)[0]["latent_scale"].item() == pytest.approx(0.13025)


def train_args(vae: Path, out: Path, *extra) -> list:
    # no vae.* keys: the imported VAE brings its architecture (a --set that disagrees: error)
    sets = [a for kv in MICRO if not kv.startswith("vae.") for a in ("--set", kv)]
    return ["--preset", "tiny", *sets, "--stage", "unet", "--vae", vae, "--out", out, *extra]


def test_stage2_on_an_imported_vae_trains_like_on_a_t2i_one_and_samples(small, ldm, tmp_path):
    model, folder = small
    runs = {}
    converted = tmp_path / "converted.safetensors"
    assert invoke(data_cli, "convert-vae", folder, converted).exit_code == 0
    for name, vae in (("folder", folder), ("converted", converted)):
        runs[name] = tmp_path / name
        result = invoke(train_cli, *train_args(vae, runs[name], "--cache-latents",
                                               "--set", "train.sample_every=4"))
        assert result.exit_code == 0, result.output
        assert (runs[name] / "samples" / "unet-0000004.png").is_file()  # the training grid
    assert vae_sha256(runs["folder"]) == vae_sha256(folder)  # one latent-cache identity
    config = json.loads((runs["folder"] / "config.json").read_text())
    assert config["vae"]["base_channels"] == 32 and config["vae"]["post_quant_conv"] is True
    assert config["unet"]["in_channels"] == 4 and config["vae"]["norm_groups"] == 8
    assert config == json.loads((runs["converted"] / "config.json").read_text())
    copy = open_vae(runs["folder"])  # RUN/vae.safetensors, in t2i's format
    assert_same_function(copy, model)
    for name in ("model.safetensors", "ema.safetensors"):  # same VAE, same training, same bits
        a, b = (load_weights(runs[r] / "unet" / "ckpt-0000004" / name)[0] for r in runs)
        assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = invoke(train_cli, *train_args(folder, runs["folder"], "--resume", "auto",
                                            "--steps", 5))
    assert resumed.exit_code == 0, resumed.output
    other = invoke(train_cli, *train_args(ldm[2], runs["folder"], "--resume", "auto"))
    assert other.exit_code == 2 and "holds another VAE" in error_line(other.output)
    result = invoke(sample_cli, runs["folder"], "a red circle", "--steps", 2,
                    "--out", tmp_path / "images")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "a-red-circle-seed0.png").is_file()
    report = invoke(eval_cli, runs["folder"], "--suite", "vae", "--n", 4)
    assert report.exit_code == 0, report.output


def broken_inputs(small, ldm, root: Path) -> dict[str, Path]:
    """Inputs import must refuse, by what is wrong with them."""
    model, folder = small
    (root / "no-config").mkdir()
    (root / "no-config" / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes())
    flux = root / "flux"
    flux.mkdir()
    raw = json.loads((folder / "config.json").read_text())
    (flux / "config.json").write_text(json.dumps({**raw, "latent_channels": 16,
                                                  "shift_factor": 0.1159,
                                                  "use_quant_conv": False}))
    (flux / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")
    tensors, _ = load_weights(ldm[2])
    del tensors["first_stage_model.decoder.up.0.block.1.conv2.weight"]
    save_weights(root / "missing.safetensors", tensors)
    save_weights(root / "unet.safetensors", {"input_blocks.0.0.weight": torch.zeros(2, 2)})
    return {"no config.json": root / "no-config", "shift_factor": flux / "config.json",
            "1 missing": root / "missing.safetensors", "holds no VAE": root / "unet.safetensors"}


def test_bad_inputs_are_one_error_line_naming_the_file(small, ldm, tmp_path):
    for needle, path in broken_inputs(small, ldm, tmp_path).items():
        source = path.parent if path.name == "config.json" else path
        result = invoke(data_cli, "convert-vae", source, tmp_path / "out.safetensors")
        assert result.exit_code == 2, (needle, result.output)
        line = error_line(result.output)
        assert needle in line and str(path) in line, line
        assert not (tmp_path / "out.safetensors").exists()
    trained = invoke(train_cli, *train_args(tmp_path / "no-config", tmp_path / "run"))
    assert trained.exit_code == 2 and "no config.json" in error_line(trained.output)
    assert not (tmp_path / "run").exists()
