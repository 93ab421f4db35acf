"""`t2i-train`: train the VAE, the diffusion UNet, or both (the default), from a preset.

With no arguments: preset `tiny`, the built-in shapes set, both stages, a new run folder under
`runs/`. Every option is also settable with `--config FILE` and `--set key.sub=value`.
Under torchrun: `torchrun --nproc_per_node N -m t2i.cli.train ...` (the same options).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click
import torch

from t2i.cli.common import (FiniteFloat, OneLineCommand, UserError, output_dir, pick_device,
                            set_threads, user_errors)
from t2i.cli.train_run import (hold_run_folder, note, note_start_options, schedule_notes,
                               refuse_finished_stage_1, refuse_start_options, refuse_steps_behind,
                               refuse_trained_set_change, resolve_run, start_options,
                               with_absolute_paths)
from t2i.config import (Config, apply_overrides, check_text_training, field_rule,
                        override_key, resolve, validate)
from t2i.config.sections import InitFromConfig
from t2i.models.io import WeightsError, read_metadata, read_state_dict, require_config
from t2i.train.run import Run

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


def options_to_overrides(options: dict, run_stage: str = "all") -> list[str]:
    """Turn the explicitly given click options into `key=value` override strings. `--steps`
    and `--lr` set the VAE's with `--stage vae`, or without --stage when `run_stage` (a resumed
    run's train.stage) is "vae"; else the diffusion stage's."""
    out = [f"{OPTION_KEYS[name]}={_literal(v)}" for name, v in options.items()
           if name in OPTION_KEYS and v is not None]
    stage = options.get("stage") or run_stage
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
    """--text-encoder scratch | MODEL:TAG (open_clip) | PATH (local weights file). `scratch` is
    a tower trained from random init with the UNet (text.frozen=false unless --text-frozen,
    which training refuses). A named model or a file also sets text.width and unet.context_dim
    (the UNet cross-attends to the text states), read from open_clip's model config or the
    file's tensor shapes."""
    out = [] if frozen is None else [f"text.frozen={_literal(frozen)}"]
    if spec is None:
        return out
    if spec == "scratch":
        return out + ["text.pretrained=", "text.weights="] + (["text.frozen=false"]
                                                                if frozen is None else [])
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
    from t2i.models.text import text_state_dict
    state = text_state_dict(read_state_dict(Path(path)))
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
    """text.heads from the config a t2i safetensors file carries in its metadata, if any.
    Raises WeightsError when that metadata is not a valid config."""
    if path.suffix != ".safetensors":
        return None
    metadata = read_metadata(path)
    return require_config(path, metadata).text.heads if "config" in metadata else None


def config_type(key: str) -> click.ParamType:
    """The click type of an option that sets config `key`: the key's own legal values (one rule
    for --set, config files and options alike; a bad value names the option)."""
    kind, rule = field_rule(key)
    if rule is not None and rule.choices:
        return click.Choice(rule.choices)
    bounds = {} if rule is None else dict(min=rule.low, max=rule.high, min_open=rule.low_open,
                                          max_open=rule.high_open)
    return click.IntRange(**bounds) if kind is int else FiniteFloat(**bounds)


def check_buildable(cfg: Config, run: Run) -> None:
    """Build the run's models on the meta device (no memory, no weights), so whatever their
    constructors refuse (e.g. a text.model that open_clip does not know) fails now, before
    stage 1 trains, not when stage 2 starts. A missing text.weights file is an error unless the
    run has its tower's weights without it (init_tower.tower_stored: its own or its --init-from
    parent's stored frozen tower, or a trained tower's checkpoint)."""
    from t2i.models.text import build_text_encoder
    from t2i.models.unet import UNet
    from t2i.models.vae import VAE
    from t2i.schedulers import NoiseSchedule
    try:
        with torch.device("meta"):
            VAE(cfg.vae), UNet(cfg.unet)
        build_text_encoder(cfg.text, device="meta", load_weights=False)
        NoiseSchedule.from_config(cfg.schedule)
    except ValueError as err:  # ConfigError among them
        raise UserError(str(err)) from err
    from t2i.train.init_tower import tower_stored
    if cfg.text.weights and not Path(cfg.text.weights).is_file() and not tower_stored(cfg, run):
        raise UserError(f"text.weights {cfg.text.weights}: no such file")


def find_text_weights(cfg: Config, run: Run) -> None:
    """Find (cache) or download the pretrained text weights now, so that an offline machine
    fails at once with how to pass a local file; a run that has its tower's weights without
    them needs none (init_tower.tower_stored). Raises TextWeightsError (a ConfigError)."""
    from t2i.train.init_tower import tower_stored
    if cfg.text.pretrained and not tower_stored(cfg, run):
        from t2i.models.text import pretrained_path
        pretrained_path(cfg.text)


def with_init_from(init_from: str | None, cfg: Config, resuming: bool, run: Run,
                   vae_path: str | None, explicit: tuple[str, ...] = ()
                   ) -> tuple[Config, str | None]:
    """--init-from: the config recording the parent (t2i/train/init_from.py) and the VAE to
    train on (for stage 2 without --vae, the parent run's); a VAE file for stage 1 brings its
    architecture (t2i/train/init_vae.py: an `explicit` --set that disagrees is an error); a
    stage-2 child takes the parent's text section (text.frozen included, its tower's weights
    with it) unless `explicit` (the user's overrides, options included) sets text.*; a text
    source it names must hold the parent's frozen weights (t2i/train/init_tower.py).
    Ignored with a message when resuming: a run's parent is fixed when it starts (its
    config.json's init_from). Raises UserError for --stage all and for a path that holds no
    checkpoint of the stage, or another frozen text tower than the parent's."""
    from t2i.train.init_from import parent_vae, with_parent
    if init_from is None:
        return cfg, vae_path
    if resuming:
        was = f" (it started from {cfg.init_from.checkpoint})" if cfg.init_from.stage else ""
        note(f"--init-from {init_from} ignored: resuming {run.dir}, which continues from its "
             f"own checkpoints{was}")
        return cfg, vae_path
    try:
        cfg = with_parent(cfg, init_from, explicit)
    except ValueError as err:
        raise UserError(str(err)) from err
    except (FileNotFoundError, WeightsError) as err:
        raise UserError(f"--init-from {init_from}: {err}") from err
    found = parent_vae(cfg) if vae_path is None else None
    return cfg, str(found) if found else vae_path


def check_stage_options(stage: str, options: dict, vae_path: str | None,
                        init_from: str | None = None) -> None:
    """Refuse an option the stage would ignore silently, as if it had done what it says:
    --vae with --stage vae (it names a trained VAE for stage 2: the run would train nothing);
    --vae-steps / --vae-lr when no VAE is trained (--stage unet, or --vae replacing stage 1);
    --steps with --vae-steps (--lr with --vae-lr) for --stage vae, where both set the same
    value. (Stage-2 settings given with --stage vae are not ignored: config.json keeps them for
    `--config RUN/config.json --stage unet`.) Raises UserError."""
    if stage == "vae" and vae_path:
        fix = (f"to fine-tune this one, pass it as --init-from {vae_path}" if not init_from
               else f"--init-from {init_from} names the VAE it fine-tunes; drop --vae")
        raise UserError(f"--vae {vae_path} names a trained VAE for the diffusion stage (--stage "
                        f"unet); --stage vae trains a VAE: {fix}")
    if stage == "unet" or vae_path:
        why = ("--stage unet trains no VAE" if stage == "unet"
               else f"--vae {vae_path} replaces stage 1 (no VAE is trained)")
        for name in ("vae_steps", "vae_lr"):
            if options.get(name) is not None:
                raise UserError(f"--{name.replace('_', '-')} {options[name]}: {why}; drop it")
    if stage == "vae":
        for name in ("steps", "lr"):
            if options.get(name) is not None and options.get(f"vae_{name}") is not None:
                raise UserError(f"--{name} and --vae-{name} both set the VAE's {name} with "
                                f"--stage vae: give one")


def refuse_parent_sets(sets: tuple[str, ...]) -> None:
    """Raises UserError for `--set init_from.KEY=...`: a run's parent is recorded by
    --init-from (with the sha256 of its files), never set by hand."""
    for item in sets:
        if override_key(item).split(".")[0] == "init_from":
            raise UserError(f"--set {item}: init_from is written by t2i-train itself; start "
                            f"from a parent with --init-from PATH")


def without_file_parent(cfg: Config, config_file: str | None, init_from: str | None) -> Config:
    """A new run's `cfg` without the `init_from` its --config file carries (the parent of the
    run that wrote it: init_from comes from this command's --init-from alone), with a notice
    when that parent would have been used (a stage this run trains) and no --init-from is
    given."""
    parent = cfg.init_from
    if parent == InitFromConfig():
        return cfg
    if cfg.train.stage in (parent.stage, "all") and init_from is None:
        note(f"the init_from of --config {config_file} ({parent.checkpoint}) is not carried "
             f"into a new run: pass --init-from {parent.checkpoint} to start from it")
    return dataclasses.replace(cfg, init_from=InitFromConfig())


@click.command(cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default="tiny", show_default=True, help="tiny | small | base")
@click.option("--config", "config_file", type=click.Path(), help="JSON or TOML config file")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="config override (repeatable)")
@click.option("--data", help="shapes | local shard folder/glob | hf://jackyhate/text-to-image-2M "
                             "| a t2i-data encode folder (latent shards: --stage unet --vae)")
@click.option("--stage", type=config_type("train.stage"), help="[default: all]")
@click.option("--vae", "vae_path", type=click.Path(),
              help="reuse a trained VAE: a t2i vae.safetensors or run folder, a diffusers "
                   "AutoencoderKL folder, or an LDM / Stable Diffusion checkpoint file")
@click.option("--text-encoder", help="open_clip MODEL:TAG (e.g. ViT-B-32:laion2b_s34b_b79k) | "
                                     "local weights file | scratch (trainable, random init)")
@click.option("--text-frozen/--text-trainable", default=None,
              help="freeze the text tower, or train it with the UNet [default: the "
                   "preset's; with --init-from, the parent's]")
@click.option("--steps", type=config_type("train.unet_steps"),
              help="steps of the diffusion stage (of the VAE with --stage vae)")
@click.option("--vae-steps", type=config_type("train.vae_steps"), help="steps of the VAE stage")
@click.option("--batch-size", type=config_type("train.batch_size"),
              help="global batch per optimizer step")
@click.option("--grad-accum", type=config_type("train.grad_accum"))
@click.option("--lr", type=config_type("train.unet_lr"),
              help="learning rate of the diffusion stage (VAE with --stage vae)")
@click.option("--vae-lr", type=config_type("train.vae_lr"))
@click.option("--warmup", type=config_type("train.warmup_steps"), help="linear warm-up steps")
@click.option("--lr-schedule", type=config_type("train.lr_schedule"))
@click.option("--precision", type=config_type("train.precision"))
@click.option("--compile/--no-compile", default=None)
@click.option("--ema-decay", type=config_type("train.ema_decay"))
@click.option("--cond-drop", type=config_type("train.cond_drop"),
              help="prompt dropout for classifier-free guidance")
@click.option("--snr-gamma", type=config_type("train.snr_gamma"), help="min-SNR weighting gamma (0 = off)")
@click.option("--snr-floor", type=config_type("train.snr_floor"), help="floor of the x0 loss weight (0 = off)")
@click.option("--prediction", type=click.Choice(["epsilon", "v"]))
@click.option("--sample-every", type=config_type("train.sample_every"))
@click.option("--save-every", type=config_type("train.save_every"))
@click.option("--keep-last", type=config_type("train.keep_last"))
@click.option("--resume", help="auto | RUN folder | checkpoint folder")
@click.option("--init-from", help="RUN | RUN/<stage>/ckpt-N: start --stage unet or vae from "
                                  "its weights and EMA (fresh optimizer, step 0); with --stage "
                                  "vae also a VAE file to fine-tune (as for --vae)")
@click.option("--seed", type=config_type("train.seed"))
@click.option("--workers", type=config_type("data.workers"), help="DataLoader workers")
@click.option("--cache-latents/--no-cache-latents", default=None)
@click.option("--out", type=click.Path(file_okay=False), callback=output_dir,
              help="run folder [default: runs/<preset>-<data>-<time>]")
@click.option("--device", help="cpu | cuda | cuda:N [default: cuda if available]")
@click.option("--threads", type=click.IntRange(min=1),
              help="CPU threads for torch [default: OMP_NUM_THREADS, else the usable cores "
                   "less one per DataLoader worker]")
@click.option("--summary", is_flag=True, help="print parameter counts and FLOPs, then exit")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@user_errors
def main(preset: str, config_file: str | None, sets: tuple[str, ...], vae_path: str | None,
         resume: str | None, out: str | None, device: str | None, threads: int | None,
         summary: bool, log_every: int, **options: object) -> None:
    """Train a text-to-image model (stage 1 VAE, stage 2 diffusion UNet).

    Every option and config value is checked before any work starts."""
    overrides = options_to_overrides(options) + list(sets)
    refuse_parent_sets(sets)
    given_preset = (None if click.get_current_context().get_parameter_source("preset")
                    == click.core.ParameterSource.DEFAULT else preset)
    start_only = start_options(config_file, given_preset)
    refuse_start_options(resume, start_only)
    init_from = options.pop("init_from", None)
    # a VAE file (--init-from, --vae) may bring its architecture: cross-field checks after it
    cfg = resolve(preset, config_file, overrides, check=summary or not (init_from or vae_path))
    if summary:  # with --resume: the run's own model, as a resume would build it
        from t2i.models.summary import format_summary, summarize
        if resume is not None:
            run, resuming, _ = resolve_run(resume, out, cfg, Path("runs"))
            cfg = apply_overrides(run.read_config(), overrides) if resuming else cfg
        click.echo(format_summary(summarize(cfg)))
        return
    target = pick_device(device)
    if vae_path and not Path(vae_path).exists():
        raise UserError(f"--vae {vae_path}: no such file or folder")
    run, resuming, named = resolve_run(resume, out, cfg, Path("runs"))
    notes: list[str] = []
    if resuming:  # the run's own config, with what was given explicitly now on top
        note_start_options(start_only, run)
        saved = run.read_config()
        if saved.train.stage == "vae":  # --steps / --lr: of the stage this run trains
            overrides = options_to_overrides(options, saved.train.stage) + list(sets)
        cfg = with_absolute_paths(apply_overrides(saved, overrides), saved)
        refuse_trained_set_change(saved, cfg, run)
        refuse_finished_stage_1(cfg, run, named)
        refuse_steps_behind(cfg, run, named)
        notes = schedule_notes(saved, cfg, run, named)  # printed once the resume has started
    else:
        cfg = with_absolute_paths(without_file_parent(cfg, config_file, init_from))
    from t2i.train.unet_stage import check_latent_stage
    check_latent_stage(cfg)  # latent shards train stage 2 only: said before what it ignores
    check_stage_options(cfg.train.stage, options, vae_path, init_from)
    vae_option = "--vae" if vae_path else "--init-from"  # which option names stage 2's VAE
    cfg, vae_path = with_init_from(init_from, cfg, resuming, run, vae_path, overrides)
    from t2i.train.init_vae import with_imported_vae
    cfg = validate(with_imported_vae(cfg, vae_path, overrides, vae_option))
    check_buildable(cfg, run)
    if cfg.train.stage != "vae":  # stage 2's text tower: fail now, not after stage 1
        check_text_training(cfg.text)  # a frozen random tower is refused
        find_text_weights(cfg, run)
    set_threads(threads, cfg.data.workers)
    from t2i.cli.launch import launch
    new_folder = not run.dir.exists()
    with hold_run_folder(run, resuming):
        status = launch(cfg, run, resuming, target, vae_path, log_every, resume_from=named,
                        new_folder=new_folder, notes=notes)
    sys.exit(status)


if __name__ == "__main__":
    main()
