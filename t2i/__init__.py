"""t2i: a from-scratch latent text-to-image diffusion toolkit in PyTorch."""

__version__ = "0.1.0"
