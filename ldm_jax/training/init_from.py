"""Starting a run from another workdir's weights (training.init_from): a fine-tuning run from
converted Stable Diffusion weights, or a 512x512 stage from the 256x256 stage before it.

Only the weights are taken, the ones that workdir samples with (its EMA params when its
sampling.use_ema is set); the optimiser state and the step count start afresh, and so does the
EMA: a copy of the loaded weights whose warm-up (training.ema_warmup) counts from step 0, as a
new run's does. The weights must fit the new run's model exactly: a different architecture is a
one-line error naming it.
"""
from __future__ import annotations

import os

import jax

from ldm_jax.config_checks import ConfigError


def initial_weights(source: str, abstract_params, shardings):
    """(params, note) restored from the latest checkpoint of workdir `source`."""
    from ldm_jax import config_utils
    from ldm_jax.checkpoint import Checkpointer, abstract_with_sharding
    source = os.path.expanduser(source)
    try:
        src_config = config_utils.load_config(source)
    except FileNotFoundError:
        raise ConfigError(f"training.init_from={source} is not a workdir (no config.json); "
                          "name a train.py workdir or one written by `python -m "
                          "ldm_jax.convert`") from None
    ckpt = Checkpointer(source, async_save=False, read_only=True)
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"training.init_from={source} holds no complete checkpoint")
    name = "ema_params" if src_config.sampling.use_ema else "params"
    if src_config.stage == "autoencoder":  # autoencoders sample with their EMA when kept
        name = "ema_params" if src_config.training.use_ema else "params"
    target = abstract_with_sharding(abstract_params, shardings)
    try:
        params = ckpt.restore_subtree(name, target, step)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"training.init_from={source}: its weights do not fit this run's "
                          f"model ({str(e).splitlines()[0][:200]}); the architectures differ") \
            from None
    finally:
        ckpt.close()
    return params, f"weights from {source} (step {step}, {name})"


def start_from(state, source: str, state_sharding):
    """The freshly initialised `state` with `source`'s weights as params and EMA."""
    abstract = jax.eval_shape(lambda s: s.params, state)
    params, note = initial_weights(source, abstract, state_sharding.params)
    copy = jax.jit(lambda p: jax.tree_util.tree_map(lambda a: a + 0, p),
                   out_shardings=state_sharding.params)
    ema = copy(params) if state.ema_params is not None else None
    return state.replace(params=params, ema_params=ema), note
