"""The three networks and their plumbing.

  layers.py   shared blocks (ResBlock, attention via SDPA, GEGLU, timestep embedding)
  vae.py      KL autoencoder: `VAE(cfg.vae)`, `DiagonalGaussian`
  unet.py     latent denoiser: `UNet(cfg.unet)(x, t, context, context_mask=None)`
  text.py     open_clip tokenizer + text tower: `tokenize`, `build_text_encoder`, `padding_mask`
  io.py       weight files, the only reader/writer of safetensors: `save_weights` /
              `load_weights` (sha256-verified), `load_into`, `read_state_dict`, `WeightsError`
  checkpoints.py  checkpoint folders: ckpt-N layout, sha256 manifest, `latest`, pruning,
              damage checks: `write_checkpoint` / `read_checkpoint` / `newest_intact`
  summary.py  parameter counts and FLOPs per sample: `summarize(cfg)`, `format_summary(rows)`
"""
