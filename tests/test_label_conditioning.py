"""Label conditioning: embedding rows, label dropout, guidance, and a model that learns to obey labels."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from ldm_jax import parallel, sampling
from ldm_jax.diffusion import guidance
from ldm_jax.models.label_embedding import ABSENT, DROPPED, LabelEmbedding
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer


def test_embedding_sums_one_row_per_label():
    emb = LabelEmbedding(sizes=(3, 2), features=4)
    params = emb.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    t0, t1 = params["label0"]["embedding"], params["label1"]["embedding"]
    assert t0.shape == (3 + 2, 4) and t1.shape == (2 + 2, 4)
    labels = jnp.array([[0, 1], [2, ABSENT], [DROPPED, DROPPED]], jnp.int32)
    out = emb.apply({"params": params}, labels)
    np.testing.assert_allclose(out[0], t0[2] + t1[3], rtol=1e-6)
    np.testing.assert_allclose(out[1], t0[4] + t1[1], rtol=1e-6)
    np.testing.assert_allclose(out[2], t0[0] + t1[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"shape \(batch, 2\)"):
        emb.apply({"params": params}, jnp.zeros((3,), jnp.int32))


def test_unet_takes_labels_exactly_when_conditional():
    config = tiny_config("", **{"model.label_keys": ("background", "shape_0")})
    model = ddpm_stage.build_model(config)
    assert model.label_sizes == (4, 5)
    x, t = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="labels must be given"):
        model.init(jax.random.PRNGKey(0), x, t)
    unconditional = ddpm_stage.build_model(tiny_config(""))
    with pytest.raises(ValueError, match="labels must be given"):
        unconditional.init(jax.random.PRNGKey(0), x, t, labels=jnp.zeros((2, 2), jnp.int32))


def test_drop_labels_withholds_whole_rows_at_the_given_rate():
    labels = jnp.tile(jnp.arange(3, dtype=jnp.int32), (20000, 1))
    dropped = np.asarray(guidance.drop_labels(labels, jax.random.PRNGKey(0), 0.3))
    row_dropped = (dropped == DROPPED).all(axis=1)
    assert np.all(row_dropped | (dropped == np.arange(3)).all(axis=1))  # all or nothing per row
    assert abs(row_dropped.mean() - 0.3) < 0.02
    kept = guidance.drop_labels(labels, jax.random.PRNGKey(0), 0.0)
    np.testing.assert_array_equal(kept, labels)


def test_guided_output_extrapolates_from_unconditional():
    # A fake model whose output depends on the labels, so cond and uncond differ.
    def apply(x, t, labels):
        informed = (labels != DROPPED).sum(axis=1).astype(x.dtype)
        return x * (1.0 + informed[:, None]) + t[:, None].astype(x.dtype)

    x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    t = jnp.array([5, 7], jnp.int32)
    labels = jnp.array([[0, 1], [2, ABSENT]], jnp.int32)
    cond = apply(x, t, labels)
    uncond = apply(x, t, jnp.full_like(labels, DROPPED))
    for scale in (0.0, 1.0, 3.5):
        np.testing.assert_allclose(guidance.guided_output(apply, x, t, labels, scale),
                                   uncond + scale * (cond - uncond), rtol=1e-6)
    np.testing.assert_allclose(guidance.guided_output(apply, x, t, labels, 1.0), cond, rtol=1e-6)


def _train_on_two_labelled_images(steps=150):
    """x0-prediction on two images told apart only by their 'background' label."""
    config = tiny_config("", **{"diffusion.parameterization": "x0", "model.dropout": 0.0,
                                "optimizer.lr": 3e-3, "optimizer.warmup_steps": 0,
                                "optimizer.grad_clip": 0.0, "model.label_keys": ("background",),
                                "training.label_drop_prob": 0.0})
    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, steps)
    state = jax.jit(lambda k: ddpm_stage.init_state(config, model, tx, k))(jax.random.PRNGKey(0))
    step = jax.jit(ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn))
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    a = (np.stack([yy, xx, yy * xx], -1) * 2 - 1).astype(np.float32)
    b = (np.stack([xx, 1 - yy, 1 - xx], -1) * 2 - 1).astype(np.float32)
    batch = {"image": np.stack([a, b] * 4), "labels": np.array([[0], [1]] * 4, np.int32)}
    for _ in range(steps):
        state, _ = step(state, batch)
    return config, model, schedule, state, a, b


def test_model_learns_to_follow_its_labels():
    config, model, schedule, state, a, b = _train_on_two_labelled_images()
    # At the last timestep the input is almost pure noise: only the label can tell a from b.
    x_t = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    t = jnp.full((2,), schedule.num_timesteps - 1, jnp.int32)
    pred = np.asarray(model.apply({"params": state.params}, x_t, t,
                                  labels=jnp.array([[0], [1]], jnp.int32)))
    err = lambda p, target: float(np.mean((p - target) ** 2))
    assert err(pred[0], a) < 0.25 * err(pred[0], b), (err(pred[0], a), err(pred[0], b))
    assert err(pred[1], b) < 0.25 * err(pred[1], a), (err(pred[1], b), err(pred[1], a))

    # Sampling with those labels draws each image; the guidance scale is traced (no recompile).
    config.sampling.sampler = "ddim"
    sample_fn = sampling.make_sample_fn(model, schedule, config.sampling, "x0", (8, 32, 32, 3),
                                        parallel.make_mesh(), guided=True)
    labels = np.array([[0], [1]] * 4, np.int32)
    for scale in (1.0, 2.0):
        images = np.asarray(sampling.sample_images(sample_fn, state.params, 0, 4, 0.0, labels, scale))
        assert np.mean((images[0::2] - a) ** 2) < 0.25 * np.mean((images[0::2] - b) ** 2)
        assert np.mean((images[1::2] - b) ** 2) < 0.25 * np.mean((images[1::2] - a) ** 2)
    assert sample_fn._cache_size() == 1
