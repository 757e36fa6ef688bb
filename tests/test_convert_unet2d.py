"""diffusers UNet2DModel -> our UNet: converted weights reproduce PyTorch's outputs."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

import jax.numpy as jnp  # noqa: E402

from ldm_jax.convert.diffusers_unet2d import (load_unet2d_params,  # noqa: E402
                                              unet2d_config_to_model_kwargs,
                                              unet2d_state_dict_to_params)
from ldm_jax.models.unet import UNet  # noqa: E402

SIZE = 16
# The DDPM reference style (single-head attention, eps 1e-6, bottom/right downsample padding)
# and the ADM/SD style (multi-head, eps 1e-5, symmetric padding).
CONFIGS = {
    "ddpm": dict(attention_head_dim=None, norm_eps=1e-6, downsample_padding=0),
    "multihead": dict(attention_head_dim=16, norm_eps=1e-5, downsample_padding=1),
}


def _tiny_diffusers_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=8,
        flip_sin_to_cos=False, freq_shift=1, **overrides).eval()
    # Perturb every tensor, zero-initialised ones and GroupNorm's ones/zeros included, so
    # a transposed or swapped weight cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _convert(model):
    kw = unet2d_config_to_model_kwargs(dict(model.config))
    params = unet2d_state_dict_to_params(
        _state_dict(model), num_res_blocks=kw["num_res_blocks"], channel_mult=kw["channel_mult"],
        attention_resolutions=kw["attention_resolutions"], image_size=SIZE,
        num_heads=kw["num_heads"], head_dim=kw["head_dim"])
    return params, kw


def _assert_same_outputs(model, params, kw):
    rng = np.random.RandomState(1)
    x = rng.randn(4, 3, SIZE, SIZE).astype(np.float32)
    t = np.array([0, 17, 500, 999])
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t)).sample.numpy()
    out = UNet(**kw).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                           jnp.asarray(t, jnp.int32), train=False)
    out = np.asarray(out).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("style", sorted(CONFIGS))
def test_converted_unet_matches_diffusers(style):
    model = _tiny_diffusers_unet(**CONFIGS[style])
    params, kw = _convert(model)
    assert kw["attention_resolutions"] == (SIZE // 2,)
    n_ours = sum(int(np.prod(p.shape)) for p in _leaves(params))
    assert n_ours == sum(p.numel() for p in model.parameters())
    _assert_same_outputs(model, params, kw)


def _leaves(tree):
    return [v for sub in tree.values() for v in (_leaves(sub) if isinstance(sub, dict) else [sub])]


def test_legacy_attention_names_and_folder_loading(tmp_path):
    model = _tiny_diffusers_unet(seed=3, **CONFIGS["ddpm"])
    # Checkpoints saved before diffusers' Attention refactor use query/key/value/proj_attn.
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in _state_dict(model).items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd[k] = v
    assert any(".proj_attn." in k for k in sd)
    kw = unet2d_config_to_model_kwargs(dict(model.config))
    params = unet2d_state_dict_to_params(
        sd, num_res_blocks=2, channel_mult=(1, 2), attention_resolutions=(SIZE // 2,),
        image_size=SIZE)
    _assert_same_outputs(model, params, kw)

    model.save_pretrained(str(tmp_path), safe_serialization=True)
    params, kw = load_unet2d_params(str(tmp_path))
    _assert_same_outputs(model, params, kw)


@pytest.fixture(scope="module")
def ddpm_state_dict():
    return _state_dict(_tiny_diffusers_unet(**CONFIGS["ddpm"]))


def _convert_sd(sd):
    return unet2d_state_dict_to_params(sd, num_res_blocks=2, channel_mult=(1, 2),
                                       attention_resolutions=(SIZE // 2,), image_size=SIZE)


def test_missing_key_is_named(ddpm_state_dict):
    sd = dict(ddpm_state_dict)
    del sd["up_blocks.0.resnets.2.time_emb_proj.weight"]
    with pytest.raises(KeyError, match=r"up_blocks\.0\.resnets\.2\.time_emb_proj\.weight"):
        _convert_sd(sd)


def test_wrong_shape_is_named(ddpm_state_dict):
    sd = dict(ddpm_state_dict)
    sd["down_blocks.1.resnets.0.conv1.weight"] = np.zeros((64, 32, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"down_blocks\.1\.resnets\.0\.conv1\.weight"):
        _convert_sd(sd)
    sd = dict(ddpm_state_dict)
    sd["mid_block.attentions.0.to_k.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError, match=r"mid_block\.attentions\.0\.to_k\.weight"):
        _convert_sd(sd)


def test_unexpected_key_is_named(ddpm_state_dict):
    sd = dict(ddpm_state_dict)
    sd["class_embedding.weight"] = np.zeros((10, 128), np.float32)
    with pytest.raises(ValueError, match=r"class_embedding\.weight"):
        _convert_sd(sd)
    # Weights for attention layers the requested U-Net lacks must not be dropped silently.
    with pytest.raises(ValueError, match=r"unexpected source keys.*down_blocks\.1\.attentions"):
        unet2d_state_dict_to_params(ddpm_state_dict, num_res_blocks=2, channel_mult=(1, 2),
                                    attention_resolutions=(), image_size=SIZE)


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "CrossAttnDownBlock2D"),
    ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "attention levels differ"),
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
])
def test_unsupported_configs_raise(change, message):
    config = dict(_tiny_diffusers_unet(**CONFIGS["ddpm"]).config)
    config.update(change)
    with pytest.raises(ValueError, match=message):
        unet2d_config_to_model_kwargs(config)


def test_ddpm_cifar10_config_maps_to_our_defaults():
    # google/ddpm-cifar10-32's config.json (its published values).
    config = {
        "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06,
        "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    kw = unet2d_config_to_model_kwargs(config)
    defaults = UNet()
    for name in ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                 "num_heads", "head_dim", "norm_groups", "norm_eps", "downsample_padding"):
        assert kw[name] == getattr(defaults, name), name
