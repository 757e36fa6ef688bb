"""The pixel-space DDPM stage: model, schedule, state init and the train step.

A stage supplies these pieces; the shared loop in `loop.py` runs them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import guidance, objectives, schedules
from ldm_jax.models.initializers import init_from_one_draw
from ldm_jax.models.unet import UNet
from ldm_jax.parallel import BATCH_AXES
from ldm_jax.training.train_state import TrainState, ema_after_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def build_model(config, compute_dtype: str | None = None) -> UNet:
    m = config.model
    return UNet(base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attention_resolutions=tuple(m.attention_resolutions),
                num_heads=m.num_heads, head_dim=m.head_dim or None, dropout=m.dropout,
                norm_groups=m.norm_groups, remat=m.remat, attention=m.attention,
                label_sizes=label_sizes(config),
                dtype=_DTYPES[compute_dtype or config.training.compute_dtype])


def label_sizes(config) -> tuple:
    """Values per conditioning label (config.model.label_keys, in order); () if unconditional."""
    if not config.model.label_keys:  # no dataset to look at (sampling a converted model)
        return ()
    from ldm_jax.data import pipeline  # building a model needs no input pipeline otherwise
    sizes = pipeline.label_sizes(config.data)
    return tuple(sizes[k] for k in config.model.label_keys)


def is_guided(config) -> bool:
    """Whether sampling runs classifier-free guidance (a conditional model, scale != 1)."""
    return bool(config.model.label_keys) and config.sampling.guidance_scale != 1.0


def build_schedule(config) -> schedules.Schedule:
    d = config.diffusion
    return schedules.make_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start,
                                   beta_end=d.beta_end)


def image_shape(config, batch: int = 1) -> tuple:
    s = config.data.image_size
    return (batch, s, s, 3)


def init_state(config, model, tx, rng) -> TrainState:
    """Initialise params and optimiser state; call under jax.jit so init compiles, not runs eagerly."""
    init_rng, state_rng = jax.random.split(rng)
    x = jnp.zeros(image_shape(config), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    labels = jnp.zeros((1, len(model.label_sizes)), jnp.int32) if model.label_sizes else None
    params = init_from_one_draw(lambda k: model.init({"params": k}, x, t, labels=labels),
                                init_rng)["params"]
    return TrainState.create(params, tx, state_rng)


def make_train_step(config, model, schedule, tx: optax.GradientTransformation, lr_fn, mesh=None):
    """Returns step(state, batch) -> (state, metrics), to be jitted by the loop."""
    d = config.diffusion
    accum = config.optimizer.grad_accum_steps
    drop_prob = config.training.label_drop_prob

    def loss_fn(params, x0, t, noise, labels, dropout_key):
        apply = lambda x_t, tt: model.apply({"params": params}, x_t, tt, labels=labels, train=True,
                                            rngs={"dropout": dropout_key})
        loss, _ = objectives.diffusion_loss(apply, schedule, x0, None,
                                            parameterization=d.parameterization,
                                            weighting=d.loss_weighting, snr_gamma=d.snr_gamma,
                                            t=t, noise=noise)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def batch_grads(params, images, labels, key):
        # t, noise and withheld labels are drawn for the whole batch, so accumulating
        # micro-batches sees exactly the draws of one large batch (dropout masks aside).
        noise_key, dropout_key, label_key = jax.random.split(key, 3)
        t, noise = objectives.draw_t_and_noise(schedule, noise_key, images.shape,
                                                sampling=d.timestep_sampling,
                                                logit_mean=d.logit_mean, logit_std=d.logit_std)
        if labels is not None and drop_prob > 0:
            labels = guidance.drop_labels(labels, label_key, drop_prob)
        if accum == 1:
            return grad_fn(params, images, t, noise, labels, dropout_key)
        # Strided micro-batches (row i*accum + j goes to micro-batch j) keep every micro-batch
        # spread over all devices of the data axis instead of a contiguous block on a few.
        split = lambda a: a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1)
        micro = [split(images), split(t), split(noise)]
        if labels is not None:
            micro.append(split(labels))
        if mesh is not None:
            micro = [jax.lax.with_sharding_constraint(m, NamedSharding(mesh, P(None, BATCH_AXES)))
                     for m in micro]

        def body(carry, xs):
            loss_sum, grad_sum = carry
            j, x0, tj, nj, *lj = xs
            loss, grads = grad_fn(params, x0, tj, nj, lj[0] if lj else None,
                                  jax.random.fold_in(dropout_key, j))
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                        (jnp.arange(accum), *micro))
        return loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)

    def train_step(state: TrainState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        loss, grads = batch_grads(state.params, batch["image"], batch.get("labels"), key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_after_step(state.ema_params, params, state.step, config.training)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new_state, metrics

    return train_step
