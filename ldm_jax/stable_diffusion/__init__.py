"""Stable Diffusion (and any text-to-image latent model) from the formats weights are published
in: reading diffusers folders and CompVis files into ldm-jax parts, saving them as a workdir,
loading a model to sample from wherever it is, and the `python -m ldm_jax.convert` command."""
