"""ldm: a PyTorch Lightning research framework for text-to-image latent diffusion."""

__version__ = "0.1.0"
