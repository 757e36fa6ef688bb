"""The pixel-space DDPM stage: a U-Net trained to denoise images, sampled with DDPM/DDIM."""
from __future__ import annotations

import os

import jax

from ldm_jax import sampling
from ldm_jax.config_checks import ConfigError
from ldm_jax.data.conditioning import sampling_labels
from ldm_jax.models.unet import count_params
from ldm_jax.stages import ddpm_checks
from ldm_jax.stages.api import StageRun
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.utils.image_grid import save_grid


def default_config():
    from configs import ddpm_base
    return ddpm_base.get_config()


def validate(config) -> None:
    ddpm_checks.validate(config)


def build_run(config, mesh, workdir: str, source, is_main: bool) -> StageRun:
    t = config.training
    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, t.num_steps)
    grids = _GridWriter(config, model, schedule, mesh, source, workdir, is_main)
    step = ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn, mesh)
    evaluate = None
    if config.eval.every:
        from ldm_jax.evaluation.evaluator import training_evaluator
        evaluate = training_evaluator(
            config, mesh, image_maker(config, mesh),
            lambda state: state.ema_params if config.sampling.use_ema else state.params)
    return StageRun(
        init=lambda key: ddpm_stage.init_state(config, model, tx, key),
        train_step=lambda state, batch, frozen: step(state, batch),
        describe=lambda abstract: f"U-Net: {count_params(abstract.params):,} parameters",
        label_keys=tuple(config.model.label_keys),
        periodic=grids if t.sample_every else None,
        evaluate=evaluate, evaluate_every=config.eval.every)


def abstract_run(config, mesh):
    """(StageRun, global batch as ShapeDtypeStructs, frozen inputs, notes): the step without
    data, for planning memory (ldm_jax/memory_plan.py)."""
    import jax.numpy as jnp
    model = ddpm_stage.build_model(config)
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    step = ddpm_stage.make_train_step(config, model, ddpm_stage.build_schedule(config), tx,
                                      lr_fn, mesh)
    b, s = config.training.batch_size, config.data.image_size
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)}
    if config.model.label_keys:
        batch["labels"] = jax.ShapeDtypeStruct((b, len(config.model.label_keys)), jnp.int32)
    run = StageRun(init=lambda key: ddpm_stage.init_state(config, model, tx, key),
                   train_step=lambda state, batch, frozen: step(state, batch),
                   describe=lambda abstract: "")
    return run, batch, None, []


class _GridWriter:
    """Draws training.num_samples images with the sampling config and writes them as a grid."""

    def __init__(self, config, model, schedule, mesh, source, workdir, is_main):
        self.config, self.model, self.schedule, self.mesh = config, model, schedule, mesh
        self.source, self.workdir, self.is_main = source, workdir, is_main
        self.sample_fn = None

    def __call__(self, state, step: int) -> list:
        c = self.config
        if self.sample_fn is None:  # compiled on first use only
            shape = ddpm_stage.image_shape(c, c.training.num_samples)
            self.sample_fn = sampling.make_sample_fn(
                self.model, self.schedule, c.sampling, c.diffusion.parameterization, shape,
                self.mesh, guided=ddpm_stage.is_guided(c))
            self.labels, self.captions = sampling_labels(c, c.training.num_samples,
                                                         source=self.source)
        params = state.ema_params if c.sampling.use_ema else state.params
        images = sampling.sample_images(self.sample_fn, params, c.seed, c.sampling.num_steps,
                                        c.sampling.eta, self.labels, c.sampling.guidance_scale)
        if not self.is_main:
            return []
        path = save_grid(jax.device_get(images),
                         os.path.join(self.workdir, "samples", f"step_{step:08d}.png"),
                         captions=self.captions)
        return [f"wrote {path}"]


def image_maker(config, mesh, workdir: str | None = None):
    """Evaluation draws samples with the sampling config (steps, sampler, eta, guidance)."""
    from ldm_jax.evaluation.evaluator import ImageMaker
    model, schedule = ddpm_stage.build_model(config), ddpm_stage.build_schedule(config)
    s = config.sampling
    compiled = {}

    def make(params, labels, n, seed):
        if n not in compiled:
            compiled[n] = sampling.make_sample_fn(
                model, schedule, s, config.diffusion.parameterization,
                ddpm_stage.image_shape(config, n), mesh, guided=ddpm_stage.is_guided(config))
        return sampling.sample_images(compiled[n], params, seed, s.num_steps, s.eta, labels,
                                      s.guidance_scale)

    return ImageMaker("samples", make, label_keys=tuple(config.model.label_keys))


def load_for_evaluation(workdir: str, config, mesh, step=None, use_ema: bool = True):
    """(params, step) of a checkpoint, for image_maker's make."""
    from ldm_jax import generate
    _, params, step = generate.load_params(workdir, config, mesh, use_ema, step)
    return params, step


def sample(workdir: str, config, options: dict) -> str:
    """sample.py for a DDPM workdir: a grid of new images."""
    from ldm_jax import generate
    if options.get("reconstruct"):
        raise ConfigError("--reconstruct needs an autoencoder workdir; this one is a DDPM "
                          "(stage 'ddpm'): drop the flag")
    for flag, key in (("--prompt", "prompts"), ("--negative_prompt", "negative_prompt"),
                      ("--init_image", "init_image"), ("--mask", "mask"),
                      ("--strength", "strength")):
        if options.get(key):
            raise ConfigError(f"{flag} is for latent-diffusion workdirs; this one is a pixel "
                              "DDPM: drop the flag")
    classes = options.get("classes")
    num = options["num"]
    if num is None:
        num = len(classes) if classes else 16
    path, seconds = generate.sample_from_workdir(
        workdir, num=num, classes=classes, steps=options["steps"], sampler=options["sampler"],
        eta=options["eta"], seed=options["seed"], out=options["out"],
        use_ema=False if options["raw_params"] else None, step=options["step"],
        guidance=options["guidance"], split=options["split"], caption=options["caption"])
    return f"wrote {path} ({num} images, {seconds:.1f}s)"
