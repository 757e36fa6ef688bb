"""The KL autoencoder: converted diffusers weights reproduce PyTorch's encode/decode; the
posterior's math against float64 hand computations; latent shapes and size errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from ldm_jax.convert.diffusers_autoencoder import (autoencoder_kl_config_to_model_kwargs,
                                                   autoencoder_kl_state_dict_to_params,
                                                   latent_scaling, load_autoencoder_kl)
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, init_params, latent_shape

try:
    import diffusers
    import torch
except ImportError:  # the equivalence tests need the `test` extra
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch and diffusers")

SIZE = 32
BLOCKS = {
    "mid_attention_only": (("DownEncoderBlock2D", "DownEncoderBlock2D"),
                           ("UpDecoderBlock2D", "UpDecoderBlock2D")),
    # Attention at the second level (16 x 16), in both halves.
    "attention_at_16": (("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
}


def _tiny_diffusers_vae(blocks="attention_at_16", seed=0):
    torch.manual_seed(seed)
    down, up = BLOCKS[blocks]
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
        sample_size=SIZE).eval()
    # GroupNorm affines start at ones/zeros: perturb every vector so that a swapped norm
    # (norm1/norm2, group_norm/conv_norm_out) or bias cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        # Shrink the first activations to a variance near GroupNorm's epsilon, so that a wrong
        # epsilon (1e-5 for 1e-6) changes the outputs well beyond the tolerance.
        for conv, scale in ((model.encoder.conv_in, 1e-3), (model.decoder.conv_in, 1e-2)):
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
    return model


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _convert(model):
    kw = autoencoder_kl_config_to_model_kwargs(dict(model.config))
    return autoencoder_kl_state_dict_to_params(_state_dict(model), kw), kw


def _rel_err(ours_nhwc, ref_nchw):
    ours = np.asarray(ours_nhwc).transpose(0, 3, 1, 2)
    assert ours.shape == ref_nchw.shape
    return float(np.abs(ours - ref_nchw).max() / np.abs(ref_nchw).max())


def _nhwc(a):
    return jnp.asarray(a.transpose(0, 2, 3, 1))


@needs_torch
@pytest.mark.parametrize("blocks", sorted(BLOCKS))
def test_converted_autoencoder_matches_diffusers(blocks):
    model = _tiny_diffusers_vae(blocks)
    params, kw = _convert(model)
    assert kw["attn_resolutions"] == ((SIZE // 2,) if blocks == "attention_at_16" else ())
    assert ("down1_attn0" in params["encoder"]) == (blocks == "attention_at_16")
    assert (sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
            == sum(p.numel() for p in model.parameters()))

    rng = np.random.RandomState(1)
    x = rng.uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32)
    z = rng.randn(2, 4, SIZE // 2, SIZE // 2).astype(np.float32)
    with torch.no_grad():
        dist = model.encode(torch.from_numpy(x)).latent_dist
        ref_mean, ref_logvar = dist.mean.numpy(), dist.logvar.numpy()
        ref_dec = model.decode(torch.from_numpy(z)).sample.numpy()
        ref_rec = model(torch.from_numpy(x), sample_posterior=False).sample.numpy()

    ours = AutoencoderKL(**kw)
    variables = {"params": params}
    post = jax.jit(lambda v, x: ours.apply(v, x, method=ours.encode))(variables, _nhwc(x))
    dec = jax.jit(lambda v, z: ours.apply(v, z, method=ours.decode))(variables, _nhwc(z))
    rec, _ = jax.jit(ours.apply)(variables, _nhwc(x))
    errors = {"mean": _rel_err(post.mean, ref_mean), "logvar": _rel_err(post.logvar, ref_logvar),
              "decode": _rel_err(dec, ref_dec), "forward": _rel_err(rec, ref_rec)}
    assert max(errors.values()) <= 1e-4, errors


@needs_torch
def test_legacy_attention_names_and_conv_kernels_convert_identically():
    model = _tiny_diffusers_vae()
    params, kw = _convert(model)
    # Before diffusers' Attention refactor: query/key/value/proj_attn; old CompVis-converted
    # files also keep these projections as 1x1 conv kernels (out, in, 1, 1).
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in _state_dict(model).items():
        for new, old in legacy.items():
            if f".{new}." in k:
                k, v = k.replace(f".{new}.", f".{old}."), (v[:, :, None, None] if v.ndim == 2 else v)
        sd[k] = v
    assert sum(".proj_attn.weight" in k for k in sd) == 5 and sd[
        "encoder.mid_block.attentions.0.query.weight"].ndim == 4
    legacy_params = autoencoder_kl_state_dict_to_params(sd, kw)
    flat, flat_legacy = (traverse_util.flatten_dict(p) for p in (params, legacy_params))
    assert flat.keys() == flat_legacy.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_legacy[path], flat[path], err_msg="/".join(path))


@needs_torch
def test_safetensors_folder_round_trip(tmp_path):
    model = _tiny_diffusers_vae(seed=2)
    params, kw = _convert(model)
    model.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    loaded, loaded_kw = load_autoencoder_kl(str(tmp_path / "vae"))
    assert loaded_kw == kw
    flat, flat_loaded = (traverse_util.flatten_dict(p) for p in (params, loaded))
    assert flat.keys() == flat_loaded.keys()
    for path in flat:
        np.testing.assert_array_equal(flat_loaded[path], flat[path], err_msg="/".join(path))
    assert latent_scaling(dict(model.config)) == {"scaling_factor": 0.18215, "shift_factor": 0.0}

    # Pickled weights are never read.
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_autoencoder_kl(str(tmp_path / "bin"))


@pytest.fixture(scope="module")
def tiny_state_dict():
    if torch is None:
        pytest.skip("needs torch and diffusers")
    model = _tiny_diffusers_vae()
    return _state_dict(model), autoencoder_kl_config_to_model_kwargs(dict(model.config))


@needs_torch
def test_missing_key_is_named(tiny_state_dict):
    sd, kw = tiny_state_dict
    sd = dict(sd)
    del sd["decoder.up_blocks.1.resnets.0.conv_shortcut.bias"]
    with pytest.raises(KeyError, match=r"decoder\.up_blocks\.1\.resnets\.0\.conv_shortcut\.bias"):
        autoencoder_kl_state_dict_to_params(sd, kw)


@needs_torch
def test_unexpected_key_is_named(tiny_state_dict):
    sd, kw = tiny_state_dict
    extra = dict(sd, **{"encoder.conv_norm_out.running_mean": np.zeros(64, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected source keys.*conv_norm_out\.running_mean"):
        autoencoder_kl_state_dict_to_params(extra, kw)
    # Weights of attention layers the requested model lacks must not be dropped silently.
    with pytest.raises(ValueError, match=r"unexpected source keys.*up_blocks\.0\.attentions"):
        autoencoder_kl_state_dict_to_params(sd, dict(kw, attn_resolutions=()))


@needs_torch
def test_wrong_shape_is_named(tiny_state_dict):
    sd, kw = tiny_state_dict
    sd = dict(sd, **{"quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"quant_conv\.weight"):
        autoencoder_kl_state_dict_to_params(sd, kw)


# CompVis/stable-diffusion-v1-4's vae/config.json (its published values).
SD_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


@needs_torch
def test_sd_vae_layout_converts_completely():
    kw = autoencoder_kl_config_to_model_kwargs(SD_VAE_CONFIG)
    defaults = AutoencoderKL()
    for name in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels",
                 "norm_groups", "in_channels", "out_channels"):
        assert kw[name] == getattr(defaults, name), name
    # Every name and shape of the real 83.7M-parameter model, without its weights: the
    # meta device allocates nothing, zero-stride arrays stand in for the tensors.
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_CONFIG.items() if k[0] != "_"})
    sd = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in model.state_dict().items()}
    params = autoencoder_kl_state_dict_to_params(sd, kw)
    assert sum(int(p.size) for p in jax.tree_util.tree_leaves(params)) == 83_653_863


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownEncoderBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, "attention levels differ"),
    ({"mid_block_add_attention": False}, "mid_block_add_attention"),
    ({"use_quant_conv": False}, "use_quant_conv"),
])
def test_unsupported_configs_raise(change, message):
    config = {"block_out_channels": [32, 64], "down_block_types": list(BLOCKS["mid_attention_only"][0]),
              "up_block_types": list(BLOCKS["mid_attention_only"][1]), **change}
    with pytest.raises(ValueError, match=message):
        autoencoder_kl_config_to_model_kwargs(config)


def test_posterior_matches_hand_computation():
    rng = np.random.RandomState(0)
    mean = rng.randn(3, 2, 2, 4)
    logvar = rng.uniform(-3, 3, (3, 2, 2, 4))
    logvar[0, 0, 0, 0], logvar[1, 1, 1, 3] = -45.0, 27.0  # outside LDM's clamp range
    post = DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, logvar], -1)))

    clamped = np.clip(logvar, -30, 20)
    np.testing.assert_array_equal(post.logvar, clamped.astype(np.float32))
    np.testing.assert_array_equal(post.mode(), mean.astype(np.float32))
    np.testing.assert_allclose(post.std, np.exp(0.5 * clamped), rtol=1e-6)
    np.testing.assert_allclose(post.var, np.exp(clamped), rtol=1e-6)
    kl = 0.5 * np.sum(mean ** 2 + np.exp(clamped) - 1 - clamped, axis=(1, 2, 3))
    assert post.kl().shape == (3,)
    np.testing.assert_allclose(post.kl(), kl, rtol=1e-6)

    key = jax.random.key(7)
    eps = np.asarray(jax.random.normal(key, mean.shape, jnp.float32), np.float64)
    np.testing.assert_allclose(post.sample(key), mean + np.exp(0.5 * clamped) * eps,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(post.sample(jax.random.key(8)), post.sample(key))


@pytest.mark.parametrize("ch_mult, f", [((1, 2, 4), 4), ((1, 2, 4, 4), 8), ((1, 1, 2, 2, 4), 16)])
def test_latent_shapes(ch_mult, f):
    cfg = {"ch_mult": ch_mult, "z_channels": 3}
    assert latent_shape(64, cfg) == (64 // f, 64 // f, 3)
    assert latent_shape((64, 32), cfg) == (64 // f, 32 // f, 3)
    # The module agrees with the helper (shapes only, nothing computed).
    model = AutoencoderKL(ch=32, ch_mult=ch_mult, num_res_blocks=1, z_channels=3, resolution=64)
    x = jax.ShapeDtypeStruct((2, 64, 32, 3), jnp.float32)
    rec, post = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x)[0], x)
    assert post.mean.shape == (2, 64 // f, 32 // f, 3) and rec.shape == x.shape


def test_bad_image_size_is_one_line():
    with pytest.raises(ValueError, match=r"not divisible by 8.*model\.ch_mult") as err:
        latent_shape(60, {"ch_mult": (1, 2, 4, 4), "z_channels": 4})
    assert "\n" not in str(err.value)
    model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    with pytest.raises(ValueError, match=r"33x32 is not divisible by 2"):
        jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 33, 32, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"model\.attn_resolutions \[24\]"):
        jax.eval_shape(AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32,
                                     attn_resolutions=(24,)).init,
                       jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))


def test_jitted_init_and_bf16_compute():
    model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,),
                          resolution=32)
    init = jax.jit(lambda k: init_params(model, k))
    params = init(jax.random.key(0))
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    reference = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), params)
            == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), reference))
    a, b = (traverse_util.flatten_dict(init(jax.random.key(k))) for k in (0, 1))
    assert not np.allclose(a[("encoder", "conv_in", "kernel")], b[("encoder", "conv_in", "kernel")])

    # bf16 compute with the same float32 params: float32 outputs, close to the float32 model.
    fp32 = jax.jit(model.apply)({"params": params}, x)[0]
    bf16_model = model.clone(dtype=jnp.bfloat16)
    bf16, post = jax.jit(bf16_model.apply)({"params": params}, x)
    assert bf16.dtype == post.mean.dtype == jnp.float32
    assert float(jnp.abs(bf16 - fp32).max() / jnp.abs(fp32).max()) < 3e-2
