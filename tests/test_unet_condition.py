"""diffusers UNet2DConditionModel (SD v1 layout) -> our UNet with cross-attention: converted
weights reproduce PyTorch's outputs; padded text is masked; DDPM configs are untouched."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from ldm_jax.convert.diffusers_unet2d_condition import (  # noqa: E402
    expected_param_shapes, load_unet2d_condition_params, source_keys,
    unet2d_condition_config_to_model_kwargs, unet2d_condition_state_dict_to_params)
from ldm_jax.models.unet import UNet  # noqa: E402

SIZE, CTX, CTX_LEN = 8, 32, 5
CONFIGS = {
    # SD v1 layout: conv projections, 8 heads everywhere, SD's timestep embedding.
    "sd1": dict(layers_per_block=2, attention_head_dim=8),
    # SD v2-like: linear projections, per-level heads and depths, DDPM's timestep embedding,
    # and 3 extra input channels (concat conditioning, as inpainting).
    "linear": dict(layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
                   transformer_layers_per_block=(2, 1), in_channels=7, flip_sin_to_cos=False,
                   freq_shift=1),
    # A conditioning vector added to the time embedding (class_embed_type="projection").
    "vector": dict(layers_per_block=1, class_embed_type="projection",
                   projection_class_embeddings_input_dim=6),
}


def _tiny_diffusers_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(sample_size=SIZE, in_channels=4, out_channels=4, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
              cross_attention_dim=CTX)
    model = diffusers.UNet2DConditionModel(**{**kw, **overrides}).eval()
    # Perturb every tensor (zero-initialised proj_out, norms' ones/zeros) so a transposed or
    # swapped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _convert(model):
    kw = unet2d_condition_config_to_model_kwargs(dict(model.config))
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return unet2d_condition_state_dict_to_params(sd, kw), kw


def _inputs(in_channels, batch=3, seed=1):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, in_channels, SIZE, SIZE).astype(np.float32)
    t = np.array([0, 421, 999][:batch])
    ctx = rng.randn(batch, CTX_LEN, CTX).astype(np.float32)
    return x, t, ctx


def _ours(params, kw, x, t, ctx, mask=None, vector=None):
    out = UNet(**kw).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                           jnp.asarray(t, jnp.int32), context=jnp.asarray(ctx),
                           context_mask=None if mask is None else jnp.asarray(mask),
                           vector=None if vector is None else jnp.asarray(vector))
    return np.asarray(out).transpose(0, 3, 1, 2)


def _max_rel_err(out, ref):
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def sd1():
    model = _tiny_diffusers_unet(**CONFIGS["sd1"])
    params, kw = _convert(model)
    return model, params, kw


@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_converted_unet_matches_diffusers(style, sd1):
    model, params, kw = sd1 if style == "sd1" else (None, None, None)
    if model is None:
        model = _tiny_diffusers_unet(seed=2, **CONFIGS[style])
        params, kw = _convert(model)
    assert kw["attention_levels"] == (0,) and kw["context_dim"] == CTX
    n_ours = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    assert n_ours == sum(p.numel() for p in model.parameters())
    x, t, ctx = _inputs(model.config.in_channels)
    vec = None
    if kw["vector_dim"]:
        vec = np.random.RandomState(3).randn(len(t), kw["vector_dim"]).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(ctx),
                    class_labels=None if vec is None else torch.from_numpy(vec)).sample.numpy()
    err = _max_rel_err(_ours(params, kw, x, t, ctx, vector=vec), ref)
    print(f"{style}: max relative error {err:.2e}")
    assert err <= 1e-4


def test_padded_context_is_masked(sd1):
    model, params, kw = sd1
    x, t, ctx = _inputs(4)
    pad = np.random.RandomState(7).randn(3, 4, CTX).astype(np.float32)
    padded = np.concatenate([ctx, pad], axis=1)
    mask = np.arange(padded.shape[1])[None, :].repeat(3, 0) < CTX_LEN
    plain = _ours(params, kw, x, t, ctx)
    masked = _ours(params, kw, x, t, padded, mask)
    np.testing.assert_allclose(masked, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
    # The padding tokens would change the output if the mask were ignored.
    assert _max_rel_err(_ours(params, kw, x, t, padded), plain) > 1e-3
    with torch.no_grad():  # and diffusers' encoder_attention_mask agrees
        ref = model(torch.from_numpy(x), torch.from_numpy(t),
                    encoder_hidden_states=torch.from_numpy(padded),
                    encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()
    assert _max_rel_err(masked, ref) <= 1e-4


def _param_paths(model, x, **call):
    shapes = jax.eval_shape(lambda xx: model.init(jax.random.key(0), xx,
                                                  jnp.zeros((1,), jnp.int32), **call), x)
    return set(traverse_util.flatten_dict(shapes["params"]))


def test_ddpm_param_tree_unchanged():
    small = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(8,), norm_groups=8)
    x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    reference = _param_paths(UNet(**small), x)
    explicit = UNet(**small, context_dim=None, transformer_depth=1, use_linear_projection=False,
                    attention_levels=None, in_channels=None, freq_shift=1.0,
                    flip_sin_to_cos=False, vector_dim=None)
    assert _param_paths(explicit, x) == reference
    tops = {p[0] for p in reference}
    assert tops == {"time_dense1", "time_dense2", "conv_in", "down0_res0", "down0_downsample",
                    "down1_res0", "down1_attn0", "mid_res0", "mid_attn", "mid_res1",
                    "up1_res0", "up1_res1", "up1_attn0", "up1_attn1", "up1_upsample",
                    "up0_res0", "up0_res1", "norm_out", "conv_out"}
    assert ("down1_attn0", "qkv", "kernel") in reference
    # Attention by level index is the same network as attention by resolution.
    by_level = {**small, "attention_resolutions": (), "attention_levels": (1,)}
    assert _param_paths(UNet(**by_level), x) == reference


def test_context_errors_are_named():
    model = UNet(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                 norm_groups=8, context_dim=CTX)
    x, t = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match="pass context"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t))
    with pytest.raises(ValueError, match="context must have shape"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, context=jnp.zeros((1, 3, 8))))
    with pytest.raises(ValueError, match="no cross-attention"):
        jax.eval_shape(lambda: UNet(base_channels=16, channel_mult=(1, 2), norm_groups=8,
                                    attention_resolutions=()).init(
            jax.random.key(0), x, t, context=jnp.zeros((1, 3, CTX))))


def test_unsupported_config_is_named(sd1):
    config = {**dict(sd1[0].config), "class_embed_type": "timestep"}
    with pytest.raises(ValueError, match="class_embed_type"):
        unet2d_condition_config_to_model_kwargs(config)
    sd = {k: v.numpy() for k, v in sd1[0].state_dict().items()}
    del sd["down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"]
    with pytest.raises(KeyError, match=r"attentions\.1\.transformer_blocks\.0\.attn2\.to_k"):
        unet2d_condition_state_dict_to_params(sd, sd1[2])
    sd = {k: v.numpy() for k, v in sd1[0].state_dict().items()}
    sd["class_embedding.linear_1.weight"] = np.zeros((128, 6), np.float32)
    with pytest.raises(ValueError, match=r"unexpected source keys.*class_embedding\.linear_1"):
        unet2d_condition_state_dict_to_params(sd, sd1[2])
    # Transformers at a level the weights do not have: named, not dropped.
    with pytest.raises(KeyError, match=r"down_blocks\.1\.attentions\.0"):
        unet2d_condition_state_dict_to_params(sd, {**sd1[2], "attention_levels": (0, 1)})


def test_folder_loading(sd1, tmp_path):
    model, params, kw = sd1
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    loaded, loaded_kw = load_unet2d_condition_params(str(tmp_path))
    assert loaded_kw == kw
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("config, n_params", [
    (dict(cross_attention_dim=768, attention_head_dim=8), 859_520_964),  # SD v1.x
    (dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],  # SD v2.x
          use_linear_projection=True), 865_910_724),
])
def test_full_size_sd_layouts_map_key_for_key(config, n_params):
    # The real architectures, built without memory (meta tensors / abstract shapes).
    with torch.device("meta"):
        model = diffusers.UNet2DConditionModel(sample_size=64, **config)
    kw = unet2d_condition_config_to_model_kwargs({"_class_name": "UNet2DConditionModel", **config})
    shapes = traverse_util.flatten_dict(expected_param_shapes(kw))
    keys = source_keys(kw, shapes)
    sd = model.state_dict()
    assert sorted(keys.values()) == sorted(sd)
    assert all(math.prod(shapes[p]) == sd[k].numel() for p, k in keys.items())
    assert sum(math.prod(s) for s in shapes.values()) == n_params
