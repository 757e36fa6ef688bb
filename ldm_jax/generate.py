"""Sampling from a training workdir: saved config + latest checkpoint -> PNG grid."""
from __future__ import annotations

import os
import time

import jax
import optax

from ldm_jax import config_utils, parallel, sampling
from ldm_jax.checkpoint import CHECKPOINT_DIR, Checkpointer, abstract_with_sharding
from ldm_jax.data import pipeline
from ldm_jax.data.conditioning import sampling_labels
from ldm_jax.training import ddpm_stage
from ldm_jax.utils.image_grid import is_folder_path, save_grid, save_images

_NO_OPTIMIZER = optax.identity()  # only the params' shapes are wanted


def load_params(workdir: str, config, mesh, use_ema: bool = True, step: int | None = None):
    """The EMA (or raw) params of checkpoint `step` (default latest) of `workdir`, replicated on
    `mesh`; only those are read, not the other params or the optimiser state."""
    model = ddpm_stage.build_model(config)
    abstract = jax.eval_shape(lambda k: ddpm_stage.init_state(config, model, _NO_OPTIMIZER, k),
                              jax.random.PRNGKey(0)).params
    params, step = checkpoint_params(workdir, abstract, mesh, use_ema, step)
    return model, params, step


def checkpoint_params(workdir: str, abstract, mesh, use_ema: bool = True,
                      step: int | None = None):
    """(params, step): the EMA or raw params of `abstract`'s structure from checkpoint `step`
    (default latest), replicated on `mesh`."""
    abstract = abstract_with_sharding(abstract, parallel.state_sharding(mesh, abstract))
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    step = ckpt.latest_step() if step is None else step
    available = ckpt.manager.all_steps()
    if step not in available:
        raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt.directory}; "
                                f"choose --step from {sorted(available)}")
    params = ckpt.restore_subtree("ema_params" if use_ema else "params", abstract, step)
    ckpt.close()
    return params, step


def check_trained(workdir: str) -> None:
    """FileNotFoundError unless `workdir` holds a complete checkpoint."""
    if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)) or \
            Checkpointer(workdir, async_save=False, read_only=True).latest_step() is None:
        raise FileNotFoundError(f"workdir {workdir!r} has no complete checkpoint yet; train first "
                                "(checkpoints are written every training.checkpoint_every steps)")


def sample_from_workdir(workdir: str, num: int = 16, steps: int | None = None,
                        sampler: str | None = None, eta: float | None = None, seed: int = 0,
                        out: str | None = None, use_ema: bool | None = None, step: int | None = None,
                        guidance: float | None = None, split: str = "train",
                        caption: str | None = None, classes=None):
    """Write a grid of `num` samples; returns (path, seconds spent sampling).

    A label-conditioned model samples with the labels of the first `num` records of `split`,
    or with those `caption` describes, or those of `classes` (sample.py's --class values),
    under classifier-free guidance `guidance` (default:
    the config's); their captions go to a .txt beside the PNG."""
    if out is not None:
        from ldm_jax.utils.image_grid import check_output_path
        check_output_path(out)  # a bad --out fails now, not after loading and sampling
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir!r} does not exist; pass the --workdir of a train.py run")
    config = config_utils.load_config(workdir)
    check_trained(workdir)
    if sampler:
        config.sampling.sampler = sampler
    if guidance is not None:
        if not config.model.label_keys:
            raise config_utils.ConfigError(f"--guidance={guidance}: this model is unconditional "
                                           "(model.label_keys is empty); drop the flag")
        config.sampling.guidance_scale = guidance
        config_utils.validate(config)  # e.g. guidance for a model trained without dropped labels
    if num < 1:
        raise config_utils.ConfigError(f"--num={num}: ask for at least one image")
    if steps is not None and not 1 <= steps <= config.diffusion.num_timesteps:
        raise config_utils.ConfigError(f"--steps={steps} must be between 1 and "
                                       f"{config.diffusion.num_timesteps} (the training timesteps)")
    mesh = parallel.make_mesh()
    use_ema = config.sampling.use_ema if use_ema is None else use_ema
    model, params, trained_steps = load_params(workdir, config, mesh, use_ema, step)
    schedule = ddpm_stage.build_schedule(config)
    if classes:
        if not config.model.label_keys:
            raise config_utils.ConfigError("--class: this model is unconditional "
                                           "(model.label_keys is empty); drop the flag")
        if caption is not None:
            raise config_utils.ConfigError("--class and --caption both choose the labels; "
                                           "pass one")
        from ldm_jax.data.conditioning import class_labels
        labels, captions = class_labels(config, [classes[i % len(classes)] for i in range(num)])
    else:
        labels, captions = sampling_labels(config, num,
                                           pipeline.split_name(config.data, split), caption)
    sample_fn = sampling.make_sample_fn(model, schedule, config.sampling,
                                        config.diffusion.parameterization,
                                        ddpm_stage.image_shape(config, num), mesh,
                                        guided=ddpm_stage.is_guided(config))
    start = time.time()
    images = sampling.sample_images(sample_fn, params, seed,
                                    steps or config.sampling.num_steps,
                                    config.sampling.eta if eta is None else eta,
                                    labels,
                                    config.sampling.guidance_scale)
    images = jax.device_get(images)
    seconds = time.time() - start
    out = out or os.path.join(workdir, "samples", f"sample_step{trained_steps}_seed{seed}.png")
    if is_folder_path(out):
        return save_images(images, out, captions=captions), seconds
    return save_grid(images, out, captions=captions), seconds
