"""The three networks and their plumbing.

  layers.py   shared blocks (ResBlock, attention via SDPA, GEGLU, timestep embedding)
  vae.py      KL autoencoder: `VAE(cfg.vae)`, `DiagonalGaussian`
  vae_import.py  Stable Diffusion VAEs (diffusers folders, LDM files) as t2i VAEs: `import_vae`
  vae_files.py   a VAE from any `--vae` path: `open_vae`, `vae_sha256`, `write_imported_vae`
  discriminator.py  stage 1's PatchGAN (pix2pix / LDM): `PatchDiscriminator`, `receptive_field`
  lpips.py    LPIPS-VGG16 from a local file only: `load_lpips`, `convert_lpips_weights`
  unet.py     latent denoiser: `UNet(cfg.unet)(x, t, context, context_mask=None)`
  text.py     open_clip tokenizer + text tower: `tokenize`, `build_text_encoder`, `padding_mask`
  text_hub.py   pretrained tags: the cache first, fail at once offline: `pretrained_file`
  frozen_text.py  a frozen tower stored once per run (RUN/text.safetensors), named in
              checkpoints by `TowerReference` (sha256): `run_tower`, `load_tower`
  io.py       weight files, the only reader/writer of safetensors: `save_weights` /
              `load_weights` (sha256-verified), `load_into`, `read_state_dict`, `WeightsError`
  checkpoints.py  checkpoint folders: ckpt-N layout, sha256 manifest, `latest`, pruning,
              damage checks: `write_checkpoint` / `read_checkpoint` / `newest_intact`
  summary.py  parameter counts and FLOPs per sample: `summarize(cfg)`, `format_summary(rows)`
"""
