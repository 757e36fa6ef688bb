"""The one train loop shared by every stage.

config -> data -> model -> loss -> sharded jitted step -> checkpoints, metrics and sample grids.
Every process runs this same code; each feeds only its own rows of the global batch.
"""
from __future__ import annotations

import os
import time

import jax
import numpy as np

from ldm_jax import config_utils, parallel, sampling
from ldm_jax.checkpoint import Checkpointer, abstract_with_sharding
from ldm_jax.data import pipeline
from ldm_jax.data.conditioning import sampling_labels
from ldm_jax.models.unet import count_params
from ldm_jax.training import ddpm_stage
from ldm_jax.training.metrics_logger import MetricLogger
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.utils.image_grid import save_grid
from ldm_jax.utils.memory import release_freed_heap


def _load_data(config):
    """Process 0 prepares the embedded dataset first; the others then find it on a shared
    filesystem, or prepare their own identical copy (it is deterministic) on a local one."""
    if jax.process_index() == 0:
        source = pipeline.load_source(config.data, prepare=True)
    parallel.wait_for_all_processes("data_prepared")
    if jax.process_index() != 0:
        source = pipeline.load_source(config.data, prepare=True)
    return source


def train(config, workdir: str, devices=None, stop_at: int | None = None) -> list[dict]:
    """Train (or resume) in `workdir`; returns the metrics logged by this run.

    `devices` restricts the mesh (default: all devices of all processes); `stop_at` ends the run
    after that step as if the job had been pre-empted (checkpointing there first).
    """
    config_utils.validate(config)
    t = config.training
    mesh = parallel.make_mesh(devices)
    is_main = jax.process_index() == 0
    config_utils.check_batch_divides(t.batch_size, mesh.devices.size, jax.process_count(),
                                     config.optimizer.grad_accum_steps)
    if is_main:
        config_utils.save_config(config, workdir)

    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, t.num_steps)
    rng = jax.random.PRNGKey(config.seed)

    init = lambda key: ddpm_stage.init_state(config, model, tx, key)
    abstract = jax.eval_shape(init, rng)
    state_sharding = parallel.state_sharding(mesh, abstract)
    ckpt = Checkpointer(workdir, t.keep_checkpoints, t.async_checkpointing)
    source = _load_data(config)
    data_iter = pipeline.make_train_iterator(source, config.data, t.batch_size, config.seed,
                                             jax.process_index(), jax.process_count(),
                                             config.model.label_keys)

    start = time.time()
    latest = ckpt.latest_step()
    if latest is None:
        state = jax.jit(init, out_shardings=state_sharding)(rng)
        origin = "initialised"
    else:
        state, data_state = ckpt.restore(abstract_with_sharding(abstract, state_sharding), latest)
        data_iter.set_state(data_state)
        origin = f"resumed from step {latest}"
    first_step = int(jax.device_get(state.step))

    logger = MetricLogger(workdir, t.num_steps, first_step, t.batch_size, is_main, t.progress_bar)
    logger.note(f"U-Net: {count_params(abstract.params):,} parameters; {origin} in "
                f"{time.time() - start:.1f}s; {mesh.devices.size} devices, {jax.process_count()} "
                f"process(es), global batch {t.batch_size}")

    step_fn = jax.jit(ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn, mesh),
                      in_shardings=(state_sharding, parallel.batch_sharding(mesh)),
                      out_shardings=(state_sharding, parallel.replicated(mesh)),
                      donate_argnums=(0,))
    sample_fn = None
    history, pending = [], []
    last_step = t.num_steps if stop_at is None else min(stop_at, t.num_steps)
    for step in range(first_step, last_step):
        batch = parallel.global_batch(next(data_iter), mesh)
        if step == first_step:
            # Compile ahead, then start the first step on every process at once.
            step_fn = step_fn.lower(state, batch).compile()
            parallel.wait_for_all_processes("train_step_compiled")
        state, metrics = step_fn(state, batch)
        if pending:
            # At most one step in flight: the bar counts finished steps, and the host does
            # not queue up batches and buffers ahead of the device.
            jax.block_until_ready(pending[-1])
        pending.append(metrics)
        logger.advance()
        done = step + 1
        if step == first_step:
            jax.block_until_ready(metrics)
            release_freed_heap()
            logger.note(f"first step (with compilation) took {time.time() - start:.1f}s since start-up")
            logger.reset_timer(done)
        if pending and (done % t.log_every == 0 or done == t.num_steps):
            # One host transfer per interval; per-step values are averaged for the log line.
            mean = {k: np.mean([float(m[k]) for m in pending]) for k in pending[0]}
            history.append({"step": done, **logger.log(done, mean)})
            pending = []
        if done % t.checkpoint_every == 0 or done == last_step:
            ckpt.save(done, state, data_iter.get_state(), config.to_dict())
        if t.sample_every and (done % t.sample_every == 0 or done == t.num_steps):
            if sample_fn is None:
                shape = ddpm_stage.image_shape(config, t.num_samples)
                sample_fn = sampling.make_sample_fn(model, schedule, config.sampling,
                                                    config.diffusion.parameterization, shape, mesh,
                                                    guided=ddpm_stage.is_guided(config))
                labels, captions = sampling_labels(config, t.num_samples, source=source)
            params = state.ema_params if config.sampling.use_ema else state.params
            images = sampling.sample_images(sample_fn, params, config.seed, config.sampling.num_steps,
                                            config.sampling.eta,
                                            labels,
                                            config.sampling.guidance_scale)
            if is_main:
                path = save_grid(jax.device_get(images),
                                 os.path.join(workdir, "samples", f"step_{done:08d}.png"),
                                 captions=captions)
                logger.note(f"wrote {path}")
            logger.reset_timer(done)
    ckpt.close()
    logger.close()
    return history
