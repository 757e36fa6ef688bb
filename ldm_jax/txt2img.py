"""Text-to-image models from anywhere (a workdir, a diffusers folder, a CompVis file): the
Python API, for notebooks and tests, and sample.py --pretrained.


    from ldm_jax import load_pipeline
    pipe = load_pipeline("path/to/stable-diffusion")  # diffusers folder, CompVis file, workdir
    images = pipe(prompt=["an astronaut riding a horse"], num_steps=30, guidance_scale=7.5)

`images` is uint8 (N, H, W, 3). The parts are reachable too: `encode_text`, `unet_apply`,
`vae_encode`, `vae_decode`; arrays are channels-last (NHWC) everywhere. One program is
compiled per (batch size, sampler, image size, guided or not) and reused for new prompts,
seeds, step counts and guidance scales.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config_checks import ConfigError


def load_pipeline(path: str, *, tokenizer: str | None = None, use_ema: bool | None = None,
                  parameterization: str | None = None, step: int | None = None) -> "Pipeline":
    """A diffusers Stable Diffusion folder, a CompVis single file (with `tokenizer`, a folder
    holding vocab.json and merges.txt, and for SD 2 `parameterization`) or an ldm-jax
    latent-diffusion workdir (checkpoint `step`, default the latest)."""
    from ldm_jax import parallel
    from ldm_jax.stable_diffusion import load as latent_model
    mesh = parallel.make_mesh()
    config, loaded = latent_model.load(path, mesh, tokenizer=tokenizer, use_ema=use_ema,
                                         parameterization=parameterization, step=step)
    return Pipeline(config, loaded, mesh)


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, rounded as diffusers' numpy output is."""
    x = np.clip(np.asarray(images, np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8)


class Pipeline:
    def __init__(self, config, loaded, mesh):
        self.config, self.mesh = config, mesh
        self.model, self.first, self.schedule = loaded.model, loaded.first, loaded.schedule
        self.tokenizer, self.params, self.step = loaded.tok, loaded.params, loaded.step
        self._programs = {}
        if self.tokenizer is None:
            raise ConfigError("this model is not text-conditioned; the pipeline samples "
                              "text-to-image models (use sample.py for the others)")

    @property
    def image_size(self) -> int:
        return self.config.data.image_size

    def _size(self, height, width) -> tuple:
        from ldm_jax.models.unet import check_input_size
        h, w = height or self.image_size, width or self.image_size
        f = self.first.factor
        step = f * 2 ** (len(self.config.model.channel_mult) - 1)
        for name, value in (("height", h), ("width", w)):
            if value % step or value <= 0:
                raise ConfigError(f"{name}={value}: this model takes sizes that are multiples of "
                                  f"{step} (the first stage divides by {f}, the U-Net by "
                                  f"{step // f}); try {max(step, value // step * step)}")
            check_input_size(value // f, self.config.model.channel_mult, ())
        return h, w

    def _tokens(self, prompts):
        from ldm_jax.stages import ldm_text
        return ldm_text.encode_prompts(self.tokenizer, prompts)

    def encode_text(self, prompts) -> np.ndarray:
        """(N, max_length, width) hidden states, as the U-Net cross-attends to them."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, mask = self._tokens(prompts)
        fn = self._jit("text", lambda p, i, m: self.model.encode_text(p, i, m))
        return np.asarray(fn(self.params, ids, mask))

    def unet_apply(self, latents, timesteps, context) -> np.ndarray:
        """The U-Net's output for (N, h, w, C) latents at integer `timesteps` (N,) or a scalar,
        cross-attending to `context` (N, L, D)."""
        latents = jnp.asarray(latents, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.int32), latents.shape[:1])
        fn = self._jit("unet", lambda p, x, t, c: self.model.unet.apply(
            {"params": p["unet"]}, x, t, context=c))
        return np.asarray(fn(self.params, latents, t, jnp.asarray(context, jnp.float32)))

    def vae_encode(self, images, seed: int | None = None) -> np.ndarray:
        """Images (uint8, or floats in [-1, 1]; NHWC) -> scaled latents: the posterior mean,
        or with `seed` a posterior sample (what img2img starts from)."""
        x = np.asarray(images)
        x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)
        first = self.first

        def encode(frozen, x, key):
            variables = {"params": frozen["params"]["autoencoder"], **frozen["model_state"]}
            dist = first.model.apply(variables, x, train=False, method=first.model.encode)
            z = dist.mode() if key is None else dist.sample(key)
            return z * first.scale
        key = None if seed is None else jax.random.PRNGKey(seed)
        fn = self._jit(("vae_encode", seed is None), encode)
        return np.asarray(fn(first.params, jnp.asarray(x), key))

    def vae_decode(self, latents) -> np.ndarray:
        """Scaled latents (N, h, w, C) -> images as floats in [-1, 1] (N, H, W, 3)."""
        fn = self._jit("vae_decode", lambda frozen, z: self.first.decode(frozen, z))
        return np.asarray(fn(self.first.params, jnp.asarray(latents, jnp.float32)))

    def _jit(self, key, fn):
        if key not in self._programs:
            self._programs[key] = jax.jit(fn)
        return self._programs[key]

    def __call__(self, prompt, negative_prompt=None, num_steps: int = 30,
                 guidance_scale: float = 7.5, sampler: str = "ddim", seed: int = 0,
                 latents=None, height: int | None = None, width: int | None = None,
                 eta: float = 0.0) -> np.ndarray:
        """uint8 images (N, H, W, 3), one per prompt. `latents` (N, H/8, W/8, C), as diffusers
        takes them (unit variance, before the sampler's initial scaling), replace the
        initial noise drawn from `seed`."""
        from ldm_jax.diffusion.samplers import SAMPLERS
        from ldm_jax.pipelines.latent import make_latent_sampler, sample_latent_images
        from ldm_jax.stages.ldm_sample import conditions
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ConfigError("prompt: give at least one")
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r} is not one of {list(SAMPLERS)}")
        if not 1 <= num_steps <= self.config.diffusion.num_timesteps:
            raise ConfigError(f"num_steps={num_steps} must be between 1 and "
                              f"{self.config.diffusion.num_timesteps}")
        h, w = self._size(height, width)
        n = len(prompts)
        negatives = ([negative_prompt] * n if negative_prompt is None or
                     isinstance(negative_prompt, str) else list(negative_prompt))
        if len(negatives) != n:
            raise ConfigError(f"{len(negatives)} negative prompts for {n} prompts")
        if latents is not None:
            want = (n, h // self.first.factor, w // self.first.factor, self.first.channels)
            latents = np.asarray(latents, np.float32)
            if latents.shape != want:
                raise ConfigError(f"latents have shape {latents.shape}; this call needs {want} "
                                  "(N, H/f, W/f, C), channels last")
        guided = guidance_scale != 1.0
        key = ("sample", n, sampler, h, w, guided)
        if key not in self._programs:
            config = self.config.copy_and_resolve_references()
            config.sampling.sampler = sampler
            self._programs[key] = make_latent_sampler(self.model, self.first, self.schedule,
                                                      config, n, self.mesh, guided,
                                                      size=(h, w))
        cond, uncond = conditions(self.config, self.tokenizer, prompts)
        uncond["ids"], uncond["mask"] = self._tokens([p or "" for p in negatives])
        images = sample_latent_images(self._programs[key], self.params, self.first.params, seed,
                                      num_steps, eta, guidance_scale, cond, uncond,
                                      noise=latents)
        return to_uint8(jax.device_get(images))


def sample_pretrained(path: str, options: dict) -> str:
    """sample.py --pretrained: a diffusers folder, CompVis file or workdir, sampled without
    writing a workdir; images go to --out (default samples/NAME_seedS.png)."""
    import os

    from ldm_jax import parallel
    from ldm_jax.stable_diffusion import load as latent_model
    from ldm_jax.stages import ldm_sample
    from ldm_jax.utils import image_grid
    if options.get("out") is not None:
        image_grid.check_output_path(options["out"])
    ldm_sample.image_count(options)
    mesh = parallel.make_mesh()
    config, loaded = latent_model.load(
        path, mesh, tokenizer=options.get("tokenizer"),
        parameterization=options.get("parameterization"), step=options.get("step"),
        use_ema=False if options.get("raw_params") else None)
    ldm_sample.check_options(config, options, loaded.tok)
    name = os.path.basename(os.path.normpath(path)).split(".")[0] or "pretrained"
    out = options.get("out") or os.path.join("samples", f"{name}_seed{options['seed']}.png")
    return ldm_sample.sample_loaded(config, loaded, mesh, options, out, os.path.abspath(path))
