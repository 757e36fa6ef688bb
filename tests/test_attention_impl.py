"""The attention implementation choice (model.attention) and the remat policies (model.remat).

The U-Net runs eagerly here: on a model this small, compiling each op once (shared by every
variant) is several times cheaper than compiling one whole program per variant.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config_utils
from ldm_jax.config_checks import ConfigError
from ldm_jax.models import attention_kernels, remat
from ldm_jax.models.attention_impl import select_attention
from ldm_jax.models.layers import SelfAttentionBlock
from ldm_jax.models.unet import UNet
from ldm_jax.stages.ddpm_checks import check_kernels

BF16, FP16, FP32 = jnp.bfloat16, jnp.float16, jnp.float32


@pytest.mark.parametrize("backend,dtype,head_dim,masked,max_head,want", [
    ("cpu", BF16, 64, False, 128, "chunked"),
    ("cpu", FP32, 64, True, 128, "chunked"),
    ("gpu", BF16, 64, False, 128, "cudnn"),
    ("gpu", FP16, 40, False, 128, "cudnn"),   # SD v1's 320 channels in 8 heads
    ("gpu", FP32, 64, False, 128, "xla"),     # cuDNN's fused attention is 16-bit only
    ("gpu", BF16, 64, True, 128, "xla"),      # a key padding mask does not go to cuDNN
    ("gpu", BF16, 36, False, 128, "xla"),     # not a multiple of 8
    ("gpu", BF16, 160, False, 128, "xla"),    # above 128 before Hopper ...
    ("gpu", BF16, 160, False, 256, "cudnn"),  # ... and within 256 from Hopper on
    ("gpu", BF16, 264, False, 256, "xla"),
    ("rocm", BF16, 64, False, 128, "xla"),
    ("tpu", BF16, 64, False, 128, "xla"),
])
def test_auto_picks_by_platform_dtype_head_and_mask(backend, dtype, head_dim, masked, max_head,
                                                     want):
    assert select_attention(backend, dtype, head_dim, masked, "auto", max_head) == want


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_explicit_xla_and_chunked_are_kept(backend):
    for impl in ("xla", "chunked"):
        assert select_attention(backend, FP32, 36, True, impl) == impl


@pytest.mark.parametrize("backend,dtype,head_dim,masked,cause", [
    ("cpu", BF16, 64, False, "NVIDIA GPU"),
    ("gpu", FP32, 64, False, "float32"),
    ("gpu", BF16, 36, False, "36"),
    ("gpu", BF16, 64, True, "mask"),
])
def test_explicit_cudnn_it_cannot_run_names_cause_and_fix(backend, dtype, head_dim, masked, cause):
    with pytest.raises(ValueError, match=cause) as e:
        select_attention(backend, dtype, head_dim, masked, "cudnn")
    assert "attention='auto'" in str(e.value) and "\n" not in str(e.value)


def test_explicit_cudnn_on_this_cpu_fails_when_traced_and_bad_names_are_refused():
    x = jnp.zeros((1, 4, 4, 16), BF16)
    with pytest.raises(ValueError, match="cuDNN needs an NVIDIA GPU.*use attention='auto'"):
        jax.eval_shape(SelfAttentionBlock(2, norm_groups=4, dtype=BF16, attention="cudnn").init,
                       jax.random.key(0), x)
    with pytest.raises(ValueError, match="'flash' is not one of"):
        select_attention("gpu", BF16, 64, False, "flash")


def test_the_choice_reaches_the_self_attention_block(monkeypatch):
    calls = []
    blocked = attention_kernels.chunked_attention
    monkeypatch.setattr(attention_kernels, "chunked_attention",
                        lambda *a, **k: calls.append(1) or blocked(*a, **k))
    x = jnp.zeros((1, 4, 4, 16))
    for impl, expected in (("xla", 0), ("auto", 1), ("chunked", 1)):  # auto on CPU: chunked
        calls.clear()
        jax.eval_shape(SelfAttentionBlock(2, norm_groups=4, attention=impl).init,
                       jax.random.key(0), x)
        assert len(calls) == expected, impl


# A one-level cross-attention U-Net: five residual blocks and four transformers in all.
TINY = dict(base_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
            num_heads=2, norm_groups=4, context_dim=6)


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 3)), FP32)
    t = jnp.array([3, 700])
    context = jnp.asarray(rng.standard_normal((2, 5, 6)), FP32)
    shapes = jax.eval_shape(UNet(**TINY).init, jax.random.key(0), x, t, context=context)
    # Random weights everywhere: the zero-initialised output layers would hide the blocks.
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), FP32), shapes["params"])
    return params, x, t, context


def test_xla_and_chunked_give_the_same_unet_output(tiny, monkeypatch):
    params, x, t, context = tiny
    mask = jnp.array([[True] * 5, [True, True, True, False, False]])
    calls = []
    blocked = attention_kernels.chunked_attention
    monkeypatch.setattr(attention_kernels, "chunked_attention",
                        lambda *a, **k: calls.append(1) or blocked(*a, **k))
    run = lambda impl, m: UNet(**TINY, attention=impl).apply(
        {"params": params}, x, t, context=context, context_mask=m)
    for m in (None, mask):
        np.testing.assert_allclose(run("chunked", m), run("xla", m), rtol=1e-5, atol=1e-5)
    assert len(calls) == 16  # 4 transformers x 2 attentions x 2 masks, all from "chunked"
    # The mask is honoured: hiding keys changes the second example only.
    masked, unmasked = run("xla", mask), run("xla", None)
    np.testing.assert_allclose(masked[0], unmasked[0], rtol=1e-6)
    assert np.abs(np.asarray(masked[1] - unmasked[1])).max() > 1e-4


def _remat_policies(jaxpr) -> list:
    """The policy of every rematerialised region in a jaxpr, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("remat2", "checkpoint"):
            found.append(eqn.params["policy"])
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += _remat_policies(inner)
    return found


SAVE_DOTS = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _loss_grad(spec, x, t, context):
    model = UNet(**TINY, remat=spec)
    return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, x, t, context=context,
                                                   train=True) ** 2))


@pytest.fixture(scope="module")
def grads_without_remat(tiny):
    params, x, t, context = tiny
    return _loss_grad("none", x, t, context)(params)


@pytest.mark.parametrize("spec,policies", [
    ("none", set()),
    ("full", {None}),
    ("save_dots", {SAVE_DOTS}),
    ("res=full,transformer=save_dots", {None, SAVE_DOTS}),
    (True, {None}),  # an old config's bool: the residual blocks, fully
])
def test_remat_policies_keep_the_gradients(tiny, grads_without_remat, spec, policies):
    params, x, t, context = tiny
    grad_fn = _loss_grad(spec, x, t, context)
    assert set(_remat_policies(jax.make_jaxpr(grad_fn)(params).jaxpr)) == policies
    if spec == "none":
        return  # the reference itself
    got = grad_fn(params)
    for a, b in zip(jax.tree_util.tree_leaves(grads_without_remat),
                    jax.tree_util.tree_leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_remat_text_is_parsed_per_block_type():
    assert remat.parse("save_dots") == {"res": "save_dots", "transformer": "save_dots"}
    assert remat.parse("transformer=full") == {"res": "none", "transformer": "full"}
    assert remat.parse(False) == {"res": "none", "transformer": "none"}
    assert remat.parse(True) == {"res": "full", "transformer": "none"}


@pytest.mark.parametrize("bad", ["yes", "res=some", "attn=full", "", "res=full;transformer=full"])
def test_bad_remat_text_names_the_allowed_values(bad):
    with pytest.raises(ValueError, match="'none' \\| 'full' \\| 'save_dots'.*'res', 'transformer'"):
        remat.parse(bad)


def test_config_checks_and_old_bool_configs():
    config = config_utils.config_from_dict({"stage": "ddpm", "model": {"remat": True}})
    assert config.model.remat == "res=full" and config.model.attention == "auto"
    check_kernels(config.model)
    with pytest.raises(ConfigError, match="model.attention='fast' is not one of"):
        check_kernels(config_utils.config_from_dict({"model": {"attention": "fast"}}).model)
    with pytest.raises(ConfigError, match="model.remat='res=ful'.*save_dots"):
        check_kernels(config_utils.config_from_dict({"model": {"remat": "res=ful"}}).model)
