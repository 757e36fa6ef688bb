"""The train step gives the same loss and parameters on 1 device and on 8 (fake CPU) devices."""
import jax
import numpy as np
import pytest

from conftest import tiny_config
from ldm_jax import parallel
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer


def run_steps(config, devices, batches, parallel_config=None):
    """(losses, final state) of the DDPM step on `devices`, shaped by `parallel_config`."""
    mesh = parallel.make_mesh(devices, parallel_config)
    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    init = lambda k: ddpm_stage.init_state(config, model, tx, k)
    sharding = parallel.state_sharding(mesh, jax.eval_shape(init, jax.random.PRNGKey(0)),
                                       parallel_config)
    state = jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(0))
    step = jax.jit(ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn, mesh),
                   in_shardings=(sharding, parallel.batch_sharding(mesh)),
                   out_shardings=(sharding, parallel.replicated(mesh)), donate_argnums=(0,))
    losses = []
    for b in batches:
        state, metrics = step(state, parallel.global_batch({"image": b}, mesh))
        losses.append(float(metrics["loss"]))
    return losses, state


def _run_steps(config, devices, batches):
    losses, state = run_steps(config, devices, batches)
    return losses, jax.device_get(state.params), jax.device_get(state.ema_params)


@pytest.mark.parametrize("accum", [1, 2])
def test_eight_devices_match_one(accum):
    assert jax.device_count() == 8, "conftest should give 8 CPU devices"
    config = tiny_config("", **{"optimizer.grad_accum_steps": accum, "training.batch_size": 16})
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32) for _ in range(3)]
    l1, p1, e1 = _run_steps(config, jax.devices()[:1], batches)
    l8, p8, e8 = _run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l1[0] != l1[1]  # the steps really changed the parameters / noise
    for a, b in zip(jax.tree_util.tree_leaves(p8), jax.tree_util.tree_leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam magnifies reduction-order noise near 0
    for a, b in zip(jax.tree_util.tree_leaves(e8), jax.tree_util.tree_leaves(e1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam magnifies reduction-order noise near 0


def test_batch_not_divisible_by_devices_is_a_clear_error():
    from ldm_jax.config_utils import ConfigError, check_batch_divides
    with pytest.raises(ConfigError, match="not divisible by the 8 devices"):
        check_batch_divides(12, 8, 1, 1)
