"""The three networks and their plumbing.

  layers.py   shared blocks (ResBlock, attention via SDPA, GEGLU, timestep embedding)
  vae.py      KL autoencoder: `VAE(cfg.vae)`, `DiagonalGaussian`
  unet.py     latent denoiser: `UNet(cfg.unet)(x, t, context, context_mask=None)`
  text.py     open_clip tokenizer + text tower: `tokenize`, `build_text_encoder`, `padding_mask`
  io.py       safetensors `save_module` / `load_module` / `read_metadata`
  summary.py  parameter counts and FLOPs per sample: `summarize(cfg)`, `format_summary(rows)`
"""
