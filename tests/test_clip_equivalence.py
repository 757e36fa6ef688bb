"""CLIP text and vision models converted from transformers' PyTorch classes (tiny random
weights) give transformers' outputs in fp32; the text converter inverts; folders load; bad
weights fail naming the key."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ldm_jax.convert import clip_weights as cw  # noqa: E402
from ldm_jax.models.clip_vision import (CLIP_MEAN, CLIP_STD, VisionTransformer,  # noqa: E402
                                        preprocess)
from ldm_jax.models.initializers import init_from_one_draw  # noqa: E402
from ldm_jax.models.text_encoder import TextProjection, TextTransformer, pooled  # noqa: E402

VOCAB, WIDTH, HEADS = 100, 32, 4
BOS, EOS = 98, 99  # the end token is the largest id, as in CLIP's vocabulary
RTOL = 1e-4


def _text_config(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
               num_hidden_layers=3, num_attention_heads=HEADS, max_position_embeddings=16,
               projection_dim=24, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    return transformers.CLIPTextConfig(**{**cfg, **kw})


def _perturb(model, seed=0):
    """Biases and LayerNorm scales away from their 0 / 1 init, so a misplaced one shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.add_(noise)
            elif "norm" in name:
                p.mul_(1 + noise)
    return model.eval()


def _torch_model(cls, config, seed=0):
    torch.manual_seed(seed)
    return _perturb(cls(config), seed)


def _ids(length, seed=0):
    """[BOS] words [EOS] padded with 0 (rows 0, 1) or filling the whole length (row 2), and the
    mask of real tokens."""
    rng = np.random.default_rng(seed)
    rows = (5, 9, length)
    ids = np.zeros((len(rows), length), np.int64)
    for r, n in enumerate(rows):
        ids[r, :n] = [BOS, *rng.integers(1, BOS, n - 2), EOS]
    return ids, ids != 0


def _close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    err = np.abs(ours - ref).max()
    rel = err / np.abs(ref).max()
    assert rel <= RTOL, f"{what}: max abs error {err:.3g}, max relative error {rel:.3g} > {RTOL}"
    return err, rel


def _sd(model):
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _text_forward(kwargs, params, ids, mask=None, output="last"):
    out = TextTransformer(**kwargs).apply({"params": params}, jnp.asarray(ids, jnp.int32),
                                          None if mask is None else jnp.asarray(mask),
                                          output=output)
    return np.asarray(out)


@pytest.mark.parametrize("max_length,use_mask", [(16, True), (77, False)])
def test_text_model_last_hidden_state_and_pooled(max_length, use_mask):
    config = _text_config(max_position_embeddings=max_length)
    model = _torch_model(transformers.CLIPTextModel, config)
    kwargs = cw.clip_text_config_to_kwargs(config.to_dict())
    assert kwargs["activation"] == "quick_gelu" and kwargs["causal"] and kwargs["mlp_ratio"] == 4
    params = cw.clip_text_state_dict_to_params(model.state_dict(), kwargs)  # torch tensors
    ids, mask = _ids(max_length)
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask) if use_mask else None)
    hidden = _text_forward(kwargs, params, ids, mask if use_mask else None)
    _close(hidden, ref.last_hidden_state, "last_hidden_state")
    eos_id = cw.clip_text_eos_id(config.to_dict())
    _close(pooled(hidden, ids, eos_id), ref.pooler_output, "pooler_output")


def test_penultimate_gelu_matches_hidden_states_minus_2():
    # SD v2's text encoder: erf GELU, the final norm applied to the second-to-last block's output.
    config = _text_config(hidden_act="gelu")
    model = _torch_model(transformers.CLIPTextModel, config, seed=1)
    kwargs = cw.clip_text_config_to_kwargs(config.to_dict())
    assert kwargs["activation"] == "gelu"
    params = cw.clip_text_state_dict_to_params(_sd(model), kwargs)  # numpy arrays
    ids, mask = _ids(16, seed=1)
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
        ref = model.final_layer_norm(out.hidden_states[-2])
    penult = _text_forward(kwargs, params, ids, output="penultimate")
    _close(penult, ref, "penultimate")
    assert np.abs(penult - out.last_hidden_state.numpy()).max() > 1e-2


def test_text_embeds_with_projection():
    config = _text_config()
    model = _torch_model(transformers.CLIPTextModelWithProjection, config, seed=2)
    kwargs = cw.clip_text_config_to_kwargs(config.to_dict())
    params = cw.clip_text_state_dict_to_params(model.state_dict(), kwargs)
    assert params["text_projection"]["kernel"].shape == (WIDTH, 24)
    ids, mask = _ids(16, seed=2)
    with torch.no_grad():
        ref = model(torch.tensor(ids), attention_mask=torch.tensor(mask))
    hidden = _text_forward(kwargs, params, ids, mask)
    embeds = TextProjection(24).apply({"params": params["text_projection"]},
                                      pooled(hidden, ids, cw.clip_text_eos_id(config.to_dict())))
    _close(hidden, ref.last_hidden_state, "last_hidden_state")
    _close(embeds, ref.text_embeds, "text_embeds")


def _vision_config(**kw):
    cfg = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=2,
               num_attention_heads=HEADS, image_size=32, patch_size=8, projection_dim=16)
    return transformers.CLIPVisionConfig(**{**cfg, **kw})


def test_vision_model_with_projection():
    config = _vision_config()
    model = _torch_model(transformers.CLIPVisionModelWithProjection, config, seed=3)
    kwargs = cw.clip_vision_config_to_kwargs(config.to_dict())
    params = cw.clip_vision_state_dict_to_params(model.state_dict(), kwargs)
    images = np.random.default_rng(3).standard_normal((2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.tensor(images.transpose(0, 3, 1, 2)))
    hidden, pooled_out, embeds = VisionTransformer(**kwargs).apply({"params": params}, images)
    _close(hidden, ref.last_hidden_state, "vision last_hidden_state")
    _close(embeds, ref.image_embeds, "image_embeds")
    with pytest.raises(ValueError, match="preprocess"):
        VisionTransformer(**kwargs).apply({"params": params}, images[:, :16])


def test_preprocess_matches_clip_image_processor():
    # A smooth RGB image, wider than tall: shorter side resized to 32, then a centre crop.
    y, x = np.mgrid[0:48, 0:80].astype(np.float32)
    image = np.stack([128 + 100 * np.sin(x / 7), 128 + 100 * np.cos(y / 5), x + y], -1)
    image = np.clip(image, 0, 255).astype(np.uint8)
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                   crop_size={"height": 32, "width": 32})
    ref = processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(preprocess(image[None], 32))[0]
    # PIL rounds to uint8 after resizing: 0.5 / 255 in [0, 1], over CLIP's std.
    assert ours.shape == ref.shape == (32, 32, 3)
    err = np.abs(ours - ref)
    assert err.max() < 0.02 and err.mean() < 0.008, (err.max(), err.mean())
    # [-1, 1] floats read as the same picture as uint8.
    as_float = np.asarray(preprocess(image[None].astype(np.float32) / 127.5 - 1, 32))[0]
    np.testing.assert_allclose(as_float, ours, atol=1e-4)
    black = np.asarray(preprocess(np.zeros((1, 32, 32, 3), np.uint8), 32))
    np.testing.assert_allclose(black[0, 0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), rtol=1e-6)


def test_inverse_text_converter_round_trip():
    config = _text_config()
    kwargs = cw.clip_text_config_to_kwargs(config.to_dict())
    ids = jnp.zeros((1, kwargs["max_length"]), jnp.int32)
    params = dict(init_from_one_draw(TextTransformer(**kwargs).init, jax.random.key(0), ids)
                  ["params"])
    # transformers 5's own CLIPTextModel names carry no prefix.
    sd = cw.clip_text_params_to_state_dict(params, kwargs, prefix="")
    fresh = transformers.CLIPTextModel(config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    flat = traverse_util.flatten_dict(params)
    assert len(sd) == len(flat)
    for k, v in fresh.state_dict().items():
        assert np.array_equal(v.numpy(), sd[k]), k
    # The published layout ("text_model." prefix) with a projection: strict into the
    # WithProjection class, and back to the same params.
    params["text_projection"] = {"kernel": jnp.asarray(
        np.random.default_rng(0).standard_normal((WIDTH, 24)), jnp.float32)}
    sd = cw.clip_text_params_to_state_dict(params, kwargs)
    assert "text_model.embeddings.token_embedding.weight" in sd and "text_projection.weight" in sd
    fresh = transformers.CLIPTextModelWithProjection(config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    back = cw.clip_text_state_dict_to_params(fresh.state_dict(), kwargs)
    for path, value in traverse_util.flatten_dict(back).items():
        assert np.array_equal(value, traverse_util.flatten_dict(params)[path]), path
    ids, mask = _ids(16)
    with torch.no_grad():
        ref = fresh(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    _close(_text_forward(kwargs, params, ids, mask), ref, "round-trip last_hidden_state")


def test_load_text_folder_safetensors_and_bin(tmp_path):
    config = _text_config(hidden_act="gelu", eos_token_id=2)  # as SD v2's config.json
    model = _torch_model(transformers.CLIPTextModel, config, seed=4)
    ids, _ = _ids(16, seed=4)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).last_hidden_state
    st = tmp_path / "st"
    model.save_pretrained(st)  # safetensors, transformers 5 names (no prefix)
    assert (st / "model.safetensors").exists()
    kwargs, params = cw.load_clip_text_folder(str(st))
    _close(_text_forward(kwargs, params, ids), ref, "safetensors folder")
    assert cw.clip_text_eos_id(json.loads((st / "config.json").read_text())) is None
    # A .bin in the published layout (prefix, legacy position_ids buffer).
    legacy = tmp_path / "bin"
    legacy.mkdir()
    (legacy / "config.json").write_text((st / "config.json").read_text())
    sd = {"text_model." + k: v for k, v in model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(sd, legacy / "pytorch_model.bin")
    kwargs_bin, params_bin = cw.load_clip_text_folder(str(legacy))
    assert kwargs_bin == kwargs
    for path, value in traverse_util.flatten_dict(params_bin).items():
        assert np.array_equal(value, traverse_util.flatten_dict(params)[path]), path
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        cw.load_clip_text_folder(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cw.load_clip_text_folder(str(empty))


def test_bad_weights_and_configs_name_the_cause():
    config = _text_config(num_hidden_layers=2)
    kwargs = cw.clip_text_config_to_kwargs(config.to_dict())
    sd = _sd(transformers.CLIPTextModel(config))
    missing = dict(sd)
    del missing["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(KeyError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        cw.clip_text_state_dict_to_params(missing, kwargs)
    wrong = dict(sd, **{"encoder.layers.0.self_attn.q_proj.weight": np.zeros((WIDTH, 8))})
    with pytest.raises(ValueError, match=r"shape mismatch.*encoder\.layers\.0\.self_attn\.q_proj"):
        cw.clip_text_state_dict_to_params(wrong, kwargs)
    extra = dict(sd, **{"encoder.layers.2.mlp.fc1.bias": np.zeros(4 * WIDTH)})
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.layers\.2\.mlp\.fc1\.bias"):
        cw.clip_text_state_dict_to_params(extra, kwargs)
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        cw.clip_text_config_to_kwargs({**config.to_dict(), "hidden_act": "relu"})
    with pytest.raises(ValueError, match="mlp_ratio"):
        cw.clip_text_config_to_kwargs({**config.to_dict(), "intermediate_size": 40})
    assert cw.clip_text_config_to_kwargs({})["width"] == 512  # CLIPTextConfig's defaults
    vision = cw.clip_vision_config_to_kwargs(_vision_config().to_dict())
    no_proj = {k: v for k, v in _sd(transformers.CLIPVisionModelWithProjection(_vision_config()))
               .items() if not k.startswith("visual_projection")}
    with pytest.raises(KeyError, match="visual_projection.weight"):
        cw.clip_vision_state_dict_to_params(no_proj, vision)
    plain = cw.clip_vision_state_dict_to_params(no_proj, {**vision, "projection_dim": None})
    assert "projection" not in plain
