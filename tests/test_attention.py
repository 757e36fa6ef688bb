"""The CPU's blocked attention equals jax.nn.dot_product_attention, values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.attention_kernels import attention, chunked_attention


def _reference(q, k, v, mask):
    m = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m)


@pytest.mark.parametrize("block,masked", [(None, False), (4, False), (4, True), (16, True)])
def test_chunked_attention_matches_values_and_gradients(block, masked):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(kq, (2, 16, 3, 8))
    k = jax.random.normal(kk, (2, 12, 3, 8))
    v = jax.random.normal(kv, (2, 12, 3, 8))
    mask = jnp.arange(12)[None, :] < jnp.array([[7], [12]]) if masked else None
    out = chunked_attention(q, k, v, mask, block)
    np.testing.assert_allclose(out, _reference(q, k, v, mask), atol=2e-6)
    weight = jax.random.normal(kd, out.shape)
    loss = lambda f: (lambda *a: jnp.sum(f(*a, mask) * weight))
    ours = jax.grad(loss(lambda *a: chunked_attention(*a, block=block)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(_reference), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if masked:  # keys beyond a row's length get no gradient
        assert np.all(np.asarray(ours[1])[0, 7:] == 0) and np.all(np.asarray(ours[2])[0, 7:] == 0)


def test_attention_on_cpu_is_the_blocked_one_and_refuses_bad_blocks():
    q = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 2, 4))
    np.testing.assert_allclose(attention(q, q, q), _reference(q, q, q, None), atol=2e-6)
    with pytest.raises(ValueError, match="does not divide"):
        chunked_attention(q, q, q, block=4)
