"""U-Net shape/size checks, its time embedding, and the one-draw parameter init."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.initializers import init_from_one_draw
from ldm_jax.models.layers import timestep_embedding
from ldm_jax.models.unet import UNet, check_input_size, count_params


def test_cifar10_unet_has_the_papers_parameter_count():
    shapes = jax.eval_shape(lambda: UNet().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                                jnp.zeros((1,), jnp.int32)))
    assert count_params(shapes["params"]) == 35_746_307  # DDPM CIFAR-10 (35.7M)


def test_timestep_embedding_closed_form():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-math.log(10000) * np.arange(4) / 3)  # DDPM: divide by half_dim - 1
    expected = np.concatenate([np.sin(np.outer([0, 7, 999], freqs)),
                               np.cos(np.outer([0, 7, 999], freqs))], axis=1)
    np.testing.assert_allclose(emb, expected, atol=1e-5)


@pytest.mark.parametrize("size,mult,attn,message", [
    (31, (1, 2), (16,), "not divisible by 2"),
    (32, (1, 2, 2), (4,), "never occur"),
])
def test_bad_input_sizes_are_named(size, mult, attn, message):
    with pytest.raises(ValueError, match=message):
        check_input_size(size, mult, attn)


def test_small_unet_forward_shapes_and_dtype():
    model = UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=8)
    x = jnp.ones((2, 16, 16, 3))
    params = jax.jit(lambda k: init_from_one_draw(
        lambda kk: model.init(kk, x, jnp.zeros((2,), jnp.int32)), k))(jax.random.PRNGKey(0))
    out = model.apply(params, x, jnp.array([3, 500]))
    assert out.shape == x.shape and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="not divisible"):
        model.apply(params, jnp.ones((1, 15, 15, 3)), jnp.zeros((1,), jnp.int32))


def test_one_draw_init_statistics_and_determinism():
    model = UNet(base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(16,), norm_groups=8)
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,), jnp.int32)
    init = jax.jit(lambda k: init_from_one_draw(lambda kk: model.init(kk, x, t), k)["params"])
    a, b, c = init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(0)), init(jax.random.PRNGKey(1))
    plain = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, t)["params"])
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(plain)

    kernels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(a)
               if "kernel" in jax.tree_util.keystr(p)}
    random_ones = {k: v for k, v in kernels.items() if np.any(v)}
    # Zero-initialised layers (last conv of each block, attention output, conv_out) stay zero.
    assert any("conv2" in k for k in kernels) and not any("conv2" in k for k in random_ones)
    assert "['conv_out']['kernel']" not in random_ones
    for name, v in random_ones.items():
        fan_in = v.shape[0] if "qkv" in name else math.prod(v.shape[:-1])  # qkv: (C, 3, heads, d)
        scaled = np.asarray(v) * math.sqrt(fan_in)
        assert abs(scaled.std() - 1.0) < 0.1, name
        assert np.abs(scaled).max() <= 2 / 0.87962566 + 1e-4, name  # truncated at 2 std
    flat = [np.asarray(v).ravel()[:200] for v in random_ones.values()]
    assert abs(np.corrcoef(flat[0], flat[1])[0, 1]) < 0.3  # layers get different slices
    for x1, x2, x3 in zip(*(jax.tree_util.tree_leaves(p) for p in (a, b, c))):
        np.testing.assert_array_equal(x1, x2)
        if np.std(x1) > 0:  # random leaves (not the constant scales/biases) depend on the key
            assert not np.array_equal(x1, x3)
