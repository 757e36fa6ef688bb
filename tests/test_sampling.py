"""Sampling from params: a new seed, step count or eta reuses the compiled program."""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from ldm_jax import parallel, sampling
from ldm_jax.training import ddpm_stage


class _CountingModel:
    """Wraps a Flax module; counts how often sampling traces its apply."""

    def __init__(self, model):
        self.model, self.traces = model, 0

    def apply(self, *args, **kwargs):
        self.traces += 1
        return self.model.apply(*args, **kwargs)


def test_steps_seed_and_eta_do_not_recompile():
    config = tiny_config("")
    model = ddpm_stage.build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32))
    counting = _CountingModel(model)
    sample_fn = sampling.make_sample_fn(counting, ddpm_stage.build_schedule(config), config.sampling,
                                        "eps", (8, 32, 32, 3), parallel.make_mesh())
    outs = [sampling.sample_images(sample_fn, params["params"], seed, steps, eta)
            for seed, steps, eta in [(0, 3, 0.0), (1, 5, 0.0), (0, 4, 1.0)]]
    assert counting.traces == 1
    assert all(o.shape == (8, 32, 32, 3) for o in outs)
    assert all(np.all(np.abs(np.asarray(o)) <= 1.0) for o in outs)  # x0 clipped to [-1, 1]
    assert not np.allclose(outs[0], outs[1])
    again = sampling.sample_images(sample_fn, params["params"], 0, 3, 0.0)
    np.testing.assert_array_equal(again, outs[0])  # deterministic given the seed
