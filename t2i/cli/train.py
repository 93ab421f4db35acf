"""`t2i-train`: train the VAE, the diffusion UNet, or both (the default), from a preset.

With no arguments: preset `tiny`, the built-in shapes set, both stages, a new run folder under
`runs/`. Every option is also settable with `--config FILE` and `--set key.sub=value`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import torch

from t2i.cli.common import UserError, user_errors
from t2i.config import Config, apply_overrides, resolve
from t2i.train.run import Run, new_run_dir, newest_run

# option name -> config key; None values mean "not given" and leave the config alone
OPTION_KEYS = {
    "data": "data.source", "stage": "train.stage", "batch_size": "train.batch_size",
    "grad_accum": "train.grad_accum", "warmup": "train.warmup_steps",
    "lr_schedule": "train.lr_schedule", "precision": "train.precision",
    "compile": "train.compile", "ema_decay": "train.ema_decay", "cond_drop": "train.cond_drop",
    "snr_gamma": "train.snr_gamma", "snr_floor": "train.snr_floor",
    "sample_every": "train.sample_every",
    "save_every": "train.save_every", "keep_last": "train.keep_last", "seed": "train.seed",
    "workers": "data.workers", "cache_latents": "train.cache_latents",
    "vae_steps": "train.vae_steps", "vae_lr": "train.vae_lr",
}


def options_to_overrides(options: dict) -> list[str]:
    """Turn the explicitly given click options into `key=value` override strings."""
    out = [f"{OPTION_KEYS[name]}={_literal(v)}" for name, v in options.items()
           if name in OPTION_KEYS and v is not None]
    stage = options.get("stage") or "all"
    if options.get("steps") is not None:
        out.append(f"train.{'vae' if stage == 'vae' else 'unet'}_steps={options['steps']}")
    if options.get("lr") is not None:
        out.append(f"train.{'vae' if stage == 'vae' else 'unet'}_lr={options['lr']}")
    if options.get("prediction") is not None:
        pred = {"epsilon": "epsilon", "v": "v_prediction"}[options["prediction"]]
        out.append(f"schedule.prediction_type={pred}")
    out += text_encoder_overrides(options.get("text_encoder"), options.get("text_frozen"))
    return out


def _literal(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def text_encoder_overrides(spec: str | None, frozen: bool | None) -> list[str]:
    """--text-encoder scratch | MODEL:TAG (open_clip) | PATH (local weights file). A named
    model or a file also sets text.width and unet.context_dim (the UNet cross-attends to the
    text states), read from open_clip's model config or the file's tensor shapes."""
    out = [] if frozen is None else [f"text.frozen={_literal(frozen)}"]
    if spec is None:
        return out
    if spec == "scratch":
        return out + ["text.pretrained=", "text.weights="]
    if Path(spec).suffix in (".safetensors", ".pt", ".pth", ".bin") or Path(spec).exists():
        if not Path(spec).is_file():
            raise UserError(f"--text-encoder: weights file {spec!r} does not exist")
        return out + tower_from_file(spec) + [f"text.weights={spec}", "text.pretrained="]
    if ":" not in spec:
        raise UserError(f"--text-encoder {spec!r}: use scratch, MODEL:TAG (e.g. ViT-B-32:openai) "
                        "or a local weights file")
    model, tag = spec.split(":", 1)
    return out + tower_from_open_clip(model) + [f"text.model={model}", f"text.pretrained={tag}",
                                                "text.weights="]


def tower_from_open_clip(model: str) -> list[str]:
    """Width and depth of open_clip architecture `model` (its bundled JSON; no download)."""
    import open_clip
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        raise UserError(f"--text-encoder {model}: not an open_clip architecture (see "
                        f"open_clip.list_models(), e.g. ViT-B-32, ViT-L-14)")
    text = model_cfg["text_cfg"]
    width = text.get("width", 512)
    return [f"text.width={width}", f"text.layers={text.get('layers', 12)}",
            f"text.heads={text.get('heads', 8)}",
            f"text.context_length={text.get('context_length', 77)}",
            f"text.vocab_size={text.get('vocab_size', 49408)}", f"unet.context_dim={width}"]


def tower_from_file(path: str) -> list[str]:
    """A custom tower shaped like the open_clip text weights in `path`. The head count is not
    in the tensor shapes: a t2i checkpoint's config metadata gives it, else open_clip's
    convention width // 64 (override with --set text.heads=N)."""
    from t2i.models.text import _read_state_dict, text_state_dict
    state = text_state_dict(_read_state_dict(Path(path)))
    if "token_embedding.weight" not in state:
        raise UserError(f"--text-encoder {path}: no open_clip text tower in this file "
                        f"(no token_embedding.weight)")
    vocab, width = state["token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    projection = state.get("text_projection")
    embed = projection.shape[-1] if projection is not None and projection.ndim == 2 else width
    return ["text.model=custom", f"text.width={width}", f"text.layers={layers}",
            f"text.heads={saved_text_heads(Path(path)) or max(1, width // 64)}",
            f"text.context_length={state['positional_embedding'].shape[0]}",
            f"text.vocab_size={vocab}", f"text.embed_dim={embed}", f"unet.context_dim={width}"]


def saved_text_heads(path: Path) -> int | None:
    """text.heads from the config a t2i safetensors file carries in its metadata, if any."""
    if path.suffix != ".safetensors":
        return None
    from t2i.config import config_from_json
    from t2i.models.io import read_metadata
    text = read_metadata(path).get("config")
    return config_from_json(text).text.heads if text else None


def pick_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {requested}: CUDA was requested but no CUDA GPU is available")
    return device


def resolve_run(resume: str | None, out: str | None, cfg: Config, runs_root: Path) -> tuple[Run, bool]:
    """Which run folder to use and whether to resume in it."""
    if resume is None:
        return Run(Path(out) if out else new_run_dir(cfg, runs_root)), False
    if resume == "auto":
        found = Path(out) if out and (Path(out) / "config.json").is_file() else (
            None if out else newest_run(runs_root))
        if found is None:
            return Run(Path(out) if out else new_run_dir(cfg, runs_root)), False
        return Run(found), True
    path = Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such run folder or checkpoint")
    if path.name.startswith("ckpt-"):  # RUN/stage/ckpt-N -> RUN
        path = path.parent.parent
    if not (path / "config.json").is_file():
        raise UserError(f"--resume {resume}: not a t2i run folder (no config.json)")
    return Run(path), True


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="tiny", show_default=True, help="tiny | small | base")
@click.option("--config", "config_file", type=click.Path(), help="JSON or TOML config file")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config override (repeatable)")
@click.option("--data", help="shapes | local shard folder/glob | hf://jackyhate/text-to-image-2M")
@click.option("--stage", type=click.Choice(["vae", "unet", "all"]), help="[default: all]")
@click.option("--vae", "vae_path", type=click.Path(), help="reuse a trained VAE (vae.safetensors)")
@click.option("--text-encoder", help="scratch | open_clip MODEL:TAG | local weights file")
@click.option("--text-frozen/--text-trainable", default=None, help="freeze the text tower")
@click.option("--steps", type=int, help="steps of the diffusion stage (of the VAE with --stage vae)")
@click.option("--vae-steps", type=int, help="steps of the VAE stage")
@click.option("--batch-size", type=int, help="global batch per optimizer step")
@click.option("--grad-accum", type=int)
@click.option("--lr", type=float, help="learning rate of the diffusion stage (VAE with --stage vae)")
@click.option("--vae-lr", type=float)
@click.option("--warmup", type=int, help="linear warm-up steps")
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]))
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--compile/--no-compile", default=None)
@click.option("--ema-decay", type=float)
@click.option("--cond-drop", type=float, help="prompt dropout for classifier-free guidance")
@click.option("--snr-gamma", type=float, help="min-SNR weighting gamma (0 = off)")
@click.option("--snr-floor", type=float, help="floor of the x0 loss weight (0 = off)")
@click.option("--prediction", type=click.Choice(["epsilon", "v"]))
@click.option("--sample-every", type=int)
@click.option("--save-every", type=int)
@click.option("--keep-last", type=int)
@click.option("--resume", help="auto | RUN folder | checkpoint folder")
@click.option("--seed", type=int)
@click.option("--workers", type=int, help="DataLoader workers")
@click.option("--cache-latents/--no-cache-latents", default=None)
@click.option("--out", type=click.Path(), help="run folder [default: runs/<preset>-<data>-<time>]")
@click.option("--device", help="cpu | cuda | cuda:N [default: cuda if available]")
@click.option("--summary", is_flag=True, help="print parameter counts and FLOPs, then exit")
@click.option("--log-every", type=int, default=10, show_default=True)
@user_errors
def main(preset: str, config_file: str | None, sets: tuple[str, ...], vae_path: str | None,
         resume: str | None, out: str | None, device: str | None, summary: bool,
         log_every: int, **options: object) -> None:
    """Train a text-to-image model (stage 1 VAE, stage 2 diffusion UNet)."""
    overrides = options_to_overrides(options) + list(sets)
    cfg = resolve(preset, config_file, overrides)
    if summary:
        from t2i.models.summary import format_summary, summarize
        click.echo(format_summary(summarize(cfg)))
        return
    if vae_path and not Path(vae_path).is_file():
        raise UserError(f"--vae {vae_path}: no such file")
    run, resuming = resolve_run(resume, out, cfg, Path("runs"))
    if resuming:  # the run's own config, with what was given explicitly now on top
        cfg = apply_overrides(run.read_config(), overrides)
    if cfg.text.pretrained and cfg.train.stage != "vae":  # offline: fail now, not after stage 1
        from t2i.models.text import pretrained_path
        pretrained_path(cfg.text)
    from t2i.train.launch import launch
    sys.exit(launch(cfg, run, resuming, pick_device(device), vae_path, log_every))


if __name__ == "__main__":
    main()
