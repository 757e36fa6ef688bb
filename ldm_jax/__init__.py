"""ldm-jax: pixel diffusion, autoencoders, latent diffusion and Stable Diffusion in JAX/Flax."""


def load_pipeline(path: str, **kwargs):
    """A text-to-image pipeline (ldm_jax.txt2img.Pipeline) from a diffusers Stable
    Diffusion folder, a CompVis single file or an ldm-jax workdir; imported on first use so
    that `import ldm_jax` stays light."""
    from ldm_jax.txt2img import load_pipeline as load
    return load(path, **kwargs)
