"""Stable Diffusion VAEs as t2i VAEs that compute the same function.

    vae = import_vae(path)          # frozen CPU VAE, latent_scale = the file's scaling factor

Accepted (`is_foreign`):
- diffusers `AutoencoderKL`: a folder with config.json and diffusion_pytorch_model.safetensors
  (or .fp16.safetensors, or .bin), a pipeline folder holding one in vae/, or the weights file
  itself with its config.json beside it (sd-vae-ft-mse, the SD 2 and SDXL VAEs);
- the original LDM layout (Rombach et al. 2022, `ldm.models.autoencoder.AutoencoderKL`): one
  .safetensors / .ckpt / .pt file with encoder.*, decoder.*, quant_conv.*, post_quant_conv.*,
  alone or under `first_stage_model.` in a whole SD checkpoint. Pickles are read with
  torch.load(weights_only=True) only; its architecture comes from the tensor shapes.

Where each difference between their architecture and t2i's went:
- quant_conv, a 1x1 conv after the encoder's 3x3 conv_out: folded into conv_out exactly
  (`fold_pointwise`: W' = W1 W3, b' = W1 b3 + b1);
- post_quant_conv, a 1x1 conv before the decoder's 3x3 conv_in: `VAEConfig.post_quant_conv`, a
  layer. Folded, it would be exact only inside the image: conv_in zero-pads the 1x1's output,
  so the 1x1's bias b1 reaches a border pixel through fewer taps than a folded bias would;
- downsampling pads (0,1,0,1), then a stride-2 conv: `VAEConfig.downsample_padding="asymmetric"`;
- the middle attention's q, k, v (diffusers: Linear to_q/to_k/to_v, LDM: 1x1 convs q/k/v, both
  with biases) become t2i's fused qkv Linear with `VAEConfig.attention_bias`; to_out.0 / proj_out
  its `out`. One head and scale 1/sqrt(C) in all three;
- the same in all three, nothing to convert: GroupNorm eps 1e-6, SiLU, num_res_blocks ResBlocks
  per encoder level and num_res_blocks + 1 per decoder level, nearest 2x upsampling then a 3x3
  conv, logvar clamped to [-30, 20];
- latent_scale = config.json's scaling_factor (0.18215 SD 1/2, 0.13025 SDXL); LDM files do not
  record it: 0.18215 unless `scaling_factor` is given.
Refused with a WeightsError naming the file: shift_factor / latents_mean / latents_std (SD3,
FLUX: 16-channel latents with a shift t2i's latents have no place for), LDM files without
quant_conv (the same VAEs as single files), other block types or activations, not 3 channels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch

from t2i.config import (Config, ConfigError, VAEConfig, get_preset, image_multiple, to_json,
                        validate)
from t2i.models.io import (WeightsError, file_sha256, load_into, read_metadata, read_state_dict,
                           read_tensors, tensor_names)
from t2i.models.vae import VAE

SD_SCALING_FACTOR = 0.18215  # SD 1.x / 2.x; diffusers' default when config.json has none
LDM_NORM_GROUPS = 32  # LDM's Normalize hard-codes 32 groups; its files do not record them
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin")
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")  # where a whole checkpoint keeps its VAE
VAE_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# AutoencoderKL's constructor defaults (diffusers 0.42) for keys a config.json leaves out
DIFFUSERS_DEFAULTS = dict(
    _class_name="AutoencoderKL", in_channels=3, out_channels=3, act_fn="silu",
    down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"],
    block_out_channels=[64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
    scaling_factor=SD_SCALING_FACTOR, shift_factor=None, latents_mean=None, latents_std=None,
    use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
# module paths inside a ResBlock / the middle attention that the layouts name otherwise
INNER_NAMES = {"diffusers": {"skip": "conv_shortcut", "norm": "group_norm", "attn.out": "to_out.0"},
               "ldm": {"skip": "nin_shortcut", "norm": "norm", "attn.out": "proj_out"}}
QKV_NAMES = {"diffusers": ("to_q", "to_k", "to_v"), "ldm": ("q", "k", "v")}
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class Foreign:
    """A foreign VAE as read: its layout, t2i architecture, scale, tensors (checkpoint prefix
    removed) and the files it came from (weights last)."""

    layout: str  # "diffusers" | "ldm"
    cfg: VAEConfig
    scaling_factor: float
    quant_conv: bool
    tensors: dict[str, torch.Tensor]
    files: tuple[Path, ...]


# ----------------------------------------------------------------------------------------------
# Recognising and reading
# ----------------------------------------------------------------------------------------------


def layout_of(names: list[str]) -> str | None:
    """"diffusers" or "ldm" from tensor names (a checkpoint prefix allowed), else None."""
    if any("encoder.down_blocks." in k for k in names):
        return "diffusers"
    inner = [strip_prefix(k) for k in names]
    return "ldm" if any(k.startswith("encoder.down.") and ".block." in k for k in inner) else None


def strip_prefix(key: str) -> str:
    return next((key[len(p):] for p in CHECKPOINT_PREFIXES if key.startswith(p)), key)


def is_foreign(path: str | Path) -> bool:
    """True when `path` is a folder that is not a t2i run folder, a pickle (t2i writes only
    safetensors), or a safetensors file without t2i config metadata holding diffusers or LDM
    VAE tensors. Raises WeightsError for a damaged safetensors file."""
    path = Path(path)
    if path.is_dir():
        return not (path / "vae.safetensors").is_file()
    if not path.is_file():
        return False
    if path.suffix != ".safetensors":
        return True
    return "config" not in read_metadata(path) and layout_of(tensor_names(path)) is not None


def read_foreign(path: Path, scaling_factor: float | None = None) -> Foreign:
    """Read the VAE at `path` (see the module docstring); a folder's config.json is checked
    before its weights are read. Raises WeightsError naming the file when it is unreadable,
    not a VAE of either layout, or of an unsupported kind."""
    if path.name == "config.json" and path.is_file():  # the folder, named by its config
        path = path.parent
    if path.is_dir():
        config, weights = diffusers_files(path)
        cfg, scale, quant = parsed_diffusers_config(config)
        tensors = read_state_dict(weights)
    elif not path.is_file():
        raise WeightsError(f"no VAE at {str(path)!r}: no such file or folder")
    else:
        config, weights = path.parent / "config.json", path
        tensors = vae_tensors(read_tensors(path, lambda k: strip_prefix(k).startswith(VAE_ROOTS)))
    layout = layout_of(list(tensors))
    if layout == "diffusers":
        if not config.is_file():
            raise WeightsError(f"{str(path)!r} holds diffusers AutoencoderKL weights but no "
                               f"config.json beside them: give the folder with its config.json")
        if not path.is_dir():
            cfg, scale, quant = parsed_diffusers_config(config)
        tensors = {legacy_renamed(k): v for k, v in tensors.items()}
        files = (config, weights)
    elif layout == "ldm" and not path.is_dir():
        cfg, scale, quant, files = ldm_config(tensors, weights), SD_SCALING_FACTOR, True, (weights,)
    else:
        raise WeightsError(f"{str(weights)!r} holds no VAE that t2i can read: no t2i config "
                           f"metadata, no diffusers AutoencoderKL tensors (encoder.down_blocks.*) "
                           f"and no LDM ones (encoder.down.N.block.*, also under "
                           f"first_stage_model.)")
    scale = scale if scaling_factor is None else float(scaling_factor)
    return Foreign(layout, cfg, scale, quant, tensors, files)


def parsed_diffusers_config(config: Path) -> tuple[VAEConfig, float, bool]:
    """diffusers_config of the file `config`, any malformed value a WeightsError naming it."""
    try:
        return diffusers_config(read_json(config), config)
    except (KeyError, TypeError, ValueError) as err:  # a value of the wrong type
        raise WeightsError(f"{str(config)!r}: not an AutoencoderKL config ({err!r})") from err


def diffusers_files(folder: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of a diffusers AutoencoderKL folder or pipeline folder (vae/)."""
    for root in (folder, folder / "vae"):
        if (root / "config.json").is_file():
            found = [root / n for n in WEIGHT_FILES if (root / n).is_file()]
            if not found:
                raise WeightsError(f"{str(root)!r} has a config.json but no weights file "
                                   f"({', '.join(WEIGHT_FILES)})")
            return root / "config.json", found[0]
    raise WeightsError(f"{str(folder)!r} has no config.json: not a diffusers AutoencoderKL folder "
                       f"(config.json + diffusion_pytorch_model.safetensors) and not a t2i run "
                       f"folder (vae.safetensors)")


def vae_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The VAE's tensors: those under a whole checkpoint's VAE prefix, without it, if any."""
    for prefix in CHECKPOINT_PREFIXES:
        inner = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if inner:
            return inner
    return tensors


def legacy_renamed(key: str) -> str:
    """diffusers' pre-0.14 attention names (query, key, value, proj_attn) -> today's."""
    parts = key.split(".")
    if "attentions" in parts and len(parts) > 2 and parts[-2] in LEGACY_ATTENTION:
        return ".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])
    return key


def read_json(path: Path) -> dict:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsError(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(raw, dict):
        raise WeightsError(f"{str(path)!r} is not a JSON object")
    return raw


# ----------------------------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------------------------


def diffusers_config(raw: dict, file: Path) -> tuple[VAEConfig, float, bool]:
    """(t2i VAEConfig, scaling factor, has quant_conv) of an AutoencoderKL config.json."""
    c = {**DIFFUSERS_DEFAULTS, **raw}

    def refuse(why: str) -> WeightsError:
        return WeightsError(f"{str(file)!r}: {why}")

    if c["_class_name"] != "AutoencoderKL":
        raise refuse(f"_class_name {c['_class_name']!r}: t2i imports AutoencoderKL only")
    if c["shift_factor"] or c["latents_mean"] is not None or c["latents_std"] is not None:
        raise refuse(f"a VAE with a latent shift_factor or latents_mean/std (SD3, FLUX; "
                     f"{c['latent_channels']} latent channels) is not supported: t2i's latents "
                     f"are z * scaling_factor, with no shift")
    widths = [int(w) for w in c["block_out_channels"]]
    if (list(c["down_block_types"]) != ["DownEncoderBlock2D"] * len(widths)
            or list(c["up_block_types"]) != ["UpDecoderBlock2D"] * len(widths)):
        raise refuse("only DownEncoderBlock2D / UpDecoderBlock2D blocks, one per "
                     "block_out_channels entry, are supported")
    if c["act_fn"] not in ("silu", "swish") or (c["in_channels"], c["out_channels"]) != (3, 3):
        raise refuse(f"act_fn {c['act_fn']!r}, in/out channels {c['in_channels']}/"
                     f"{c['out_channels']}: t2i's VAE is SiLU on RGB")
    base = math.gcd(*widths)
    cfg = architecture(file, base_channels=base, channel_mult=tuple(w // base for w in widths),
                       num_res_blocks=int(c["layers_per_block"]),
                       z_channels=int(c["latent_channels"]), norm_groups=int(c["norm_num_groups"]),
                       mid_attention=bool(c["mid_block_add_attention"]),
                       post_quant_conv=bool(c["use_post_quant_conv"]))
    return cfg, float(c["scaling_factor"]), bool(c["use_quant_conv"])


def ldm_config(tensors: dict[str, torch.Tensor], file: Path) -> VAEConfig:
    """The t2i VAEConfig of an LDM state dict, from its tensor shapes."""
    def shape(key: str) -> torch.Size:
        if key not in tensors:
            raise WeightsError(f"{str(file)!r}: no tensor {key!r}: not a complete LDM VAE")
        return tensors[key].shape

    levels = 1 + max(index(k, 2) for k in tensors if k.startswith("encoder.down."))
    blocks = [index(k, 4) for k in tensors if k.startswith("encoder.down.0.block.")]
    widths = [shape(f"encoder.down.{i}.block.0.conv1.weight")[0] for i in range(levels)]
    z = shape("decoder.conv_in.weight")[1]
    if "quant_conv.weight" not in tensors:
        raise WeightsError(f"{str(file)!r}: no quant_conv: an SD3/FLUX-style VAE ({z} latent "
                           f"channels), whose latents need a shift_factor; not supported")
    if shape("encoder.conv_in.weight")[1] != 3:
        raise WeightsError(f"{str(file)!r}: not an RGB VAE (encoder.conv_in takes "
                           f"{shape('encoder.conv_in.weight')[1]} channels)")
    base = math.gcd(*widths)
    return architecture(file, base_channels=base, channel_mult=tuple(w // base for w in widths),
                        num_res_blocks=1 + max(blocks, default=-1), z_channels=z,
                        norm_groups=LDM_NORM_GROUPS,
                        mid_attention="encoder.mid.attn_1.q.weight" in tensors,
                        post_quant_conv=True)


def index(key: str, at: int) -> int:
    """The integer at dotted position `at` of `key` (-1 when it is not one)."""
    part = key.split(".")[at] if len(key.split(".")) > at else ""
    return int(part) if part.isdigit() else -1


def architecture(file: Path, **fields) -> VAEConfig:
    """VAEConfig of an SD-family VAE (asymmetric downsampling padding, attention biases).
    Raises WeightsError naming `file` when t2i cannot build it (e.g. norm groups)."""
    try:
        cfg = VAEConfig(downsample_padding="asymmetric", attention_bias=True, **fields)
        carrier_config(cfg)
    except (ConfigError, TypeError, ValueError) as err:
        raise WeightsError(f"{str(file)!r}: cannot build this VAE in t2i: {err}") from err
    return cfg


def carrier_config(cfg: VAEConfig) -> Config:
    """A valid whole Config around `cfg`, the one a converted file's metadata holds (so every t2i
    reader accepts it): the `base` preset with this VAE, the UNet's in/out channels = its
    z_channels, data.resolution rounded up to the image-size multiple. Only `vae` means
    anything. Raises ConfigError when `cfg` is not buildable (norm_groups)."""
    base = get_preset("base")
    z = cfg.z_channels
    draft = dataclasses.replace(base, preset="custom", vae=cfg,
                                unet=dataclasses.replace(base.unet, in_channels=z, out_channels=z))
    unit = image_multiple(draft)
    data = dataclasses.replace(draft.data, resolution=unit * math.ceil(draft.data.resolution / unit))
    return validate(dataclasses.replace(draft, data=data))


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------


def module_names(cfg: VAEConfig, layout: str) -> dict[str, str]:
    """t2i module path -> the same module's path in `layout`, walking the levels in the order
    t2i's Encoder and Decoder build their Sequentials (diffusers numbers decoder blocks from
    the deepest level, LDM by level)."""
    d = layout == "diffusers"
    names = {"decoder.post_quant_conv": "post_quant_conv"}
    for side in ("encoder", "decoder"):
        names.update({f"{side}.conv_in": f"{side}.conv_in", f"{side}.conv_out": f"{side}.conv_out",
                      f"{side}.norm_out": f"{side}.conv_norm_out" if d else f"{side}.norm_out"})
        mid = (["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"] if d
               else ["mid.block_1", "mid.attn_1", "mid.block_2"])
        names.update({f"{side}.mid.{i}": f"{side}.{m}" for i, m in enumerate(mid)})
    levels, n, i = len(cfg.channel_mult), cfg.num_res_blocks, 0
    for level in range(levels):
        for r in range(n):
            names[f"encoder.down.{i}"] = (f"encoder.down_blocks.{level}.resnets.{r}" if d
                                          else f"encoder.down.{level}.block.{r}")
            i += 1
        if level < levels - 1:
            names[f"encoder.down.{i}"] = (f"encoder.down_blocks.{level}.downsamplers.0" if d
                                          else f"encoder.down.{level}.downsample")
            i += 1
    i = 0
    for level in reversed(range(levels)):
        block = levels - 1 - level
        for r in range(n + 1):
            names[f"decoder.up.{i}"] = (f"decoder.up_blocks.{block}.resnets.{r}" if d
                                        else f"decoder.up.{level}.block.{r}")
            i += 1
        if level > 0:
            names[f"decoder.up.{i}"] = (f"decoder.up_blocks.{block}.upsamplers.0" if d
                                        else f"decoder.up.{level}.upsample")
            i += 1
    return names


def foreign_key(key: str, names: dict[str, str], layout: str) -> str:
    """The foreign name of t2i parameter `key`: its module's foreign path, then the path inside
    the module renamed (skip -> conv_shortcut / nin_shortcut, ...)."""
    parts = key.split(".")
    cut = next(i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names)
    inner = ".".join(parts[cut:-1])
    inner = INNER_NAMES[layout].get(inner, inner)
    return ".".join(filter(None, [names[".".join(parts[:cut])], inner, parts[-1]]))


def fold_pointwise(w3: torch.Tensor, b3: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One conv equal to a k x k conv (w3 (m, c, k, k), b3 (m,)) followed by a 1x1 conv
    (w1 (o, m, 1, 1), b1 (o,)): w' = W1 w3 contracted over m, b' = W1 b3 + b1, with W1 = w1
    as (o, m). Exact: both are linear and the padding acts on the first conv's input only.
    Computed in float64, returned in float32."""
    m1 = w1.double().flatten(1)  # (o, m)
    w = torch.einsum("om,mchw->ochw", m1, w3.double())  # (o, c, k, k)
    return w.float(), (m1 @ b3.double() + b1.double()).float()


def t2i_tensors(foreign: Foreign, file: Path) -> dict[str, torch.Tensor]:
    """The t2i state dict of `foreign` (latent_scale included). Raises WeightsError naming
    `file` with the foreign tensors that are missing, or left over (another architecture)."""
    theirs, layout = dict(foreign.tensors), foreign.layout
    names = module_names(foreign.cfg, layout)
    with torch.device("meta"):
        target = VAE(foreign.cfg).state_dict()
    missing: list[str] = []

    def take(key: str) -> torch.Tensor:
        if key not in theirs:
            missing.append(key)
            return torch.zeros(0)
        return theirs.pop(key)

    out = {"latent_scale": torch.tensor(foreign.scaling_factor, dtype=torch.float32)}
    try:
        for key, like in target.items():
            parts = key.split(".")
            if key == "latent_scale" or key == "encoder.conv_out.bias" and foreign.quant_conv:
                continue  # the bias: folded with the weight
            if parts[-2] == "qkv":  # fused q, k, v of the middle attention: (3C, C) or (3C,)
                where = names[".".join(parts[:3])]
                qkv = [take(f"{where}.{n}.{parts[-1]}") for n in QKV_NAMES[layout]]
                out[key] = torch.cat([t.reshape(-1, *like.shape[1:]) for t in qkv])
            elif key == "encoder.conv_out.weight" and foreign.quant_conv:
                conv = take("encoder.conv_out.weight"), take("encoder.conv_out.bias")
                quant = take("quant_conv.weight"), take("quant_conv.bias")
                if not missing:
                    out[key], out["encoder.conv_out.bias"] = fold_pointwise(*conv, *quant)
            else:
                tensor = take(foreign_key(key, names, layout))
                squeeze = tensor.ndim == 4 and like.ndim == 2 and tensor.shape[2:] == (1, 1)
                out[key] = tensor[:, :, 0, 0] if squeeze else tensor  # LDM 1x1-conv attention
    except RuntimeError as err:  # shapes that cannot be concatenated or folded
        raise WeightsError(f"{str(file)!r}: tensor shapes do not fit the architecture its "
                           f"config describes: {err}") from err
    left = sorted(k for k in theirs if k.startswith(VAE_ROOTS))
    if missing or left:
        found = [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
        found += [f"{len(left)} unexpected (e.g. {', '.join(left[:3])})"] if left else []
        raise WeightsError(f"{str(file)!r}: not a {layout} VAE of the architecture its "
                           f"{'config.json' if layout == 'diffusers' else 'shapes'} describe: "
                           f"tensors {'; '.join(found)}")
    return out


def empty_vae(cfg: VAEConfig) -> VAE:
    """A VAE with uninitialised CPU tensors (no random init: no global RNG draw, no time)."""
    with torch.device("meta"):
        vae = VAE(cfg)
    return vae.to_empty(device="cpu")


def import_vae(path: str | Path, scaling_factor: float | None = None) -> VAE:
    """The VAE at `path` (a foreign layout, see the module docstring) as a t2i VAE on the CPU,
    eval mode, frozen, latent_scale = its scaling factor (or `scaling_factor`). Raises
    WeightsError naming the file for anything it cannot import exactly."""
    path = Path(path)
    return built(read_foreign(path, scaling_factor), path)


def built(foreign: Foreign, path: Path) -> VAE:
    """The frozen t2i VAE holding `foreign`'s tensors (read from `path`)."""
    vae = empty_vae(foreign.cfg)
    load_into(vae, t2i_tensors(foreign, path), foreign.files[-1])
    return vae.eval().requires_grad_(False)


def imported_file(path: str | Path, scaling_factor: float | None = None
                  ) -> tuple[VAE, dict[str, str]]:
    """`import_vae(path, scaling_factor)` and the metadata of its t2i file: the carrier config,
    stage "import", the layout, `source_sha256` (the identity of the files it came from, see
    `sources_sha256`) and the latent scale. Raises WeightsError as import_vae."""
    path = Path(path)
    foreign = read_foreign(path, scaling_factor)
    vae = built(foreign, path)
    metadata = {"config": to_json(carrier_config(foreign.cfg)), "stage": "import",
                "import_layout": foreign.layout, "source_sha256": sources_sha256(foreign.files),
                "latent_scale": f"{foreign.scaling_factor:.8g}"}
    return vae, metadata


def sources_sha256(files: tuple[Path, ...]) -> str:
    """sha256 of one file; of several (config.json, weights), sha256 of their sha256s."""
    digests = [file_sha256(f) for f in files]
    return digests[0] if len(digests) == 1 else hashlib.sha256(" ".join(digests).encode()).hexdigest()
