"""transformers CLIP checkpoints <-> our params: the text model into `TextTransformer` (plus
CLIPTextModelWithProjection's `text_projection`), the vision model into `VisionTransformer`.

As in the U-Net converter, every parameter of the configured model is filled from exactly one
source tensor and every source tensor is used, so a config that does not match the weights
fails, naming the keys. Keys may carry the "text_model." / "vision_model." prefix (transformers
4 and published Stable Diffusion folders) or not (transformers 5's CLIPTextModel).

Note: diffusers' SD v2 text_encoder folders hold 23 of OpenCLIP ViT-H's 24 blocks, so their
output="last" already is SD v2's penultimate layer; output="penultimate" is for full-depth
encoders (SD v1 with clip_skip, CompVis checkpoints).
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.torch_files import load_torch_state_dict
from ldm_jax.models.clip_vision import VisionTransformer
from ldm_jax.models.text_encoder import TextTransformer

# transformers' hidden_act names -> ours. Every tanh-approximate GELU of transformers computes
# 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), which is our "gelu_tanh".
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_python": "gelu",
                "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_python_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
                "gelu_accurate": "gelu_tanh"}

# CLIPTextConfig / CLIPVisionConfig defaults: save_pretrained may omit keys at their default.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                  "num_hidden_layers": 12, "num_attention_heads": 8,
                  "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
                    "num_hidden_layers": 12, "num_attention_heads": 12, "num_channels": 3,
                    "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5}

# Our top-level module names -> transformers' (inside text_model. / vision_model.).
_TEXT_NAMES = {"token_embedding": "embeddings.token_embedding",
               "position_embedding": "embeddings.position_embedding",
               "final_norm": "final_layer_norm"}
_VISION_NAMES = {"patch_embedding": "embeddings.patch_embedding",
                 "class_embedding": "embeddings.class_embedding",
                 "position_embedding": "embeddings.position_embedding",
                 "pre_norm": "pre_layrnorm", "post_norm": "post_layernorm"}
# Heads outside the tower, hence without its prefix.
_HEADS = {"text_projection": "text_projection", "projection": "visual_projection"}
_BLOCK_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn": "self_attn",
                "q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
TEXT_PREFIX, VISION_PREFIX = "text_model.", "vision_model."


# ---- configs ---------------------------------------------------------------------------------

def _common_kwargs(cfg: dict, what: str) -> dict:
    act = cfg["hidden_act"]
    if act not in _ACTIVATIONS:
        raise ValueError(f"{what} hidden_act={act!r} is not supported; supported: "
                         f"{sorted(_ACTIVATIONS)}")
    width, inner = cfg["hidden_size"], cfg["intermediate_size"]
    if inner % width:
        raise ValueError(f"{what} intermediate_size={inner} is not a multiple of hidden_size="
                         f"{width}; our MLP needs an integer mlp_ratio")
    return {"width": width, "depth": cfg["num_hidden_layers"],
            "heads": cfg["num_attention_heads"], "mlp_ratio": inner // width,
            "activation": _ACTIVATIONS[act], "layer_norm_eps": float(cfg["layer_norm_eps"])}


def _refuse_combined(hf_config: dict, part: str) -> None:
    if hf_config.get("model_type") == "clip" or part in hf_config:
        raise ValueError(f"a full CLIPModel config; pass its {part!r} entry instead")


def clip_text_config_to_kwargs(hf_config: dict) -> dict:
    """`TextTransformer` keyword arguments from a CLIPTextConfig dict (e.g. the text_encoder/
    config.json of a diffusers Stable Diffusion folder). Its projection_dim, if any, is not a
    TextTransformer field: the text_projection weights carry it."""
    _refuse_combined(hf_config, "text_config")
    cfg = {**_TEXT_DEFAULTS, **hf_config}
    return {"vocab_size": cfg["vocab_size"], "max_length": cfg["max_position_embeddings"],
            **_common_kwargs(cfg, "CLIP text config"), "causal": True}


def clip_text_eos_id(hf_config: dict) -> int | None:
    """The `eos_id` for `pooled` that reproduces CLIPTextModel's pooler_output: configs written
    before transformers fixed eos_token_id carry 2 there (SD v1/v2 folders), and for them
    transformers pools at the highest token id, which is `eos_id=None`."""
    eos = {**_TEXT_DEFAULTS, **hf_config}["eos_token_id"]
    return None if eos == 2 else eos


def clip_vision_config_to_kwargs(hf_config: dict) -> dict:
    """`VisionTransformer` keyword arguments from a CLIPVisionConfig dict (the image_encoder/
    config.json of a diffusers folder). projection_dim is None for a CLIPVisionModel, whose
    checkpoint has no visual_projection."""
    _refuse_combined(hf_config, "vision_config")
    cfg = {**_VISION_DEFAULTS, **hf_config}
    sizes = {}
    for key in ("image_size", "patch_size"):
        value = cfg[key]
        if isinstance(value, (list, tuple)):
            if len(set(value)) != 1:
                raise ValueError(f"CLIP vision config {key}={value}: only square sizes convert")
            value = value[0]
        sizes[key] = int(value)
    plain = "CLIPVisionModel" in (cfg.get("architectures") or ())
    return {"image_size": sizes["image_size"], "patch_size": sizes["patch_size"],
            **_common_kwargs(cfg, "CLIP vision config"),
            "projection_dim": None if plain else cfg["projection_dim"],
            "channels": cfg["num_channels"]}


# ---- key mapping -----------------------------------------------------------------------------

def _source_key(path: tuple[str, ...], names: dict, prefix: str) -> str:
    """transformers' state-dict key of our parameter `path`."""
    top, *rest = path
    if top in _HEADS:
        return f"{_HEADS[top]}.weight"
    if not rest:  # a bare parameter (the class embedding)
        return prefix + names[top]
    *modules, leaf = rest
    m = re.fullmatch(r"layers_(\d+)", top)
    head = f"encoder.layers.{m.group(1)}" if m else names[top]
    return ".".join([prefix + head, *(_BLOCK_NAMES.get(n, n) for n in modules), _LEAVES[leaf]])


def _numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; numpy has no bfloat16, so widen first
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        value = value.numpy()
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _normalise(state_dict: dict, prefix: str) -> tuple[dict, dict]:
    """({key with `prefix`: array}, {that key: the caller's key}); buffers dropped."""
    out, origin = {}, {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # an index buffer, not a weight
            continue
        name = key if key.startswith(prefix) or key.split(".")[0] in _HEADS.values() \
            else prefix + key
        if name in out:
            raise ValueError(f"source keys {origin[name]!r} and {key!r} name the same parameter")
        out[name], origin[name] = value, key
    return out, origin


def _to_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 2:  # Linear (out, in) -> Dense (in, out)
        return value.T
    if path[-1] == "kernel" and value.ndim == 4:  # Conv2d OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    return value


def _from_flax(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 2:
        return value.T
    if path[-1] == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value


def _convert(state_dict: dict, shapes: dict, names: dict, prefix: str, what: str) -> dict:
    sd, origin = _normalise(state_dict, prefix)
    keys = {path: _source_key(path, names, prefix) for path in shapes}
    missing = sorted(set(keys.values()) - set(sd))
    if missing:
        raise KeyError(f"{what}: missing source keys (config mismatch?): {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}")
    unused = sorted(origin[k] for k in set(sd) - set(keys.values()))
    if unused:
        raise ValueError(f"{what}: unexpected source keys (config mismatch?): {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    flat = {}
    for path, key in keys.items():
        value = _to_flax(_numpy(sd[key]), path)
        if value.shape != tuple(shapes[path]):
            raise ValueError(f"{what}: shape mismatch for source {origin[key]!r} -> our "
                             f"{'/'.join(path)}: converted shape {value.shape}, expected "
                             f"{tuple(shapes[path])}")
        flat[path] = jnp.array(value)  # a copy: never aliases the caller's buffers
    return traverse_util.unflatten_dict(flat)


# ---- text ------------------------------------------------------------------------------------

def _text_shapes(kwargs: dict) -> dict:
    ids = jax.ShapeDtypeStruct((1, kwargs["max_length"]), jnp.int32)
    variables = jax.eval_shape(lambda i: TextTransformer(**kwargs).init(jax.random.key(0), i), ids)
    return traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape,
                                                             variables["params"]))


def clip_text_state_dict_to_params(state_dict: dict, kwargs: dict) -> dict:
    """Float32 params for `TextTransformer(**kwargs)` from a CLIPTextModel or
    CLIPTextModelWithProjection state dict (name -> numpy array or torch tensor). The latter's
    text_projection.weight becomes params["text_projection"]["kernel"] (width, projection_dim),
    for `TextProjection`. KeyError names missing keys, ValueError unused or mis-shaped ones."""
    shapes = _text_shapes(kwargs)
    proj = state_dict.get("text_projection.weight")
    if proj is not None:
        shapes[("text_projection", "kernel")] = (kwargs["width"], np.shape(proj)[0])
    return _convert(state_dict, shapes, _TEXT_NAMES, TEXT_PREFIX, "CLIP text model")


def clip_text_params_to_state_dict(params: dict, kwargs: dict,
                                   prefix: str = TEXT_PREFIX) -> dict:
    """The inverse: {transformers key: float32 array}. With the default prefix, the layout of
    published SD text encoders, which transformers' from_pretrained reads and which
    CLIPTextModelWithProjection (with a text_projection) loads strictly; prefix="" gives
    transformers 5's own CLIPTextModel.state_dict() names."""
    shapes = _text_shapes(kwargs)
    flat = traverse_util.flatten_dict(params)
    if ("text_projection", "kernel") in flat:
        shapes[("text_projection", "kernel")] = (kwargs["width"],
                                                 flat[("text_projection", "kernel")].shape[-1])
    if set(flat) != set(shapes):
        odd = sorted("/".join(p) for p in set(flat) ^ set(shapes))
        raise ValueError(f"params do not match TextTransformer(**kwargs): {odd[:8]}")
    out = {}
    for path, value in flat.items():
        value = np.asarray(value, np.float32)
        if value.shape != tuple(shapes[path]):
            raise ValueError(f"params {'/'.join(path)} has shape {value.shape}, expected "
                             f"{tuple(shapes[path])}")
        # A C-ordered copy: writable, and never aliasing the params' buffers.
        out[_source_key(path, _TEXT_NAMES, prefix)] = np.array(_from_flax(value, path), order="C")
    return out


# ---- vision ----------------------------------------------------------------------------------

def clip_vision_state_dict_to_params(state_dict: dict, kwargs: dict) -> dict:
    """Float32 params for `VisionTransformer(**kwargs)` from a CLIPVisionModelWithProjection
    state dict (or a CLIPVisionModel one when kwargs["projection_dim"] is None)."""
    size, channels = kwargs.get("image_size", 224), kwargs.get("channels", 3)
    images = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    variables = jax.eval_shape(
        lambda x: VisionTransformer(**kwargs).init(jax.random.key(0), x), images)
    shapes = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape,
                                                               variables["params"]))
    return _convert(state_dict, shapes, _VISION_NAMES, VISION_PREFIX, "CLIP vision model")


# ---- folders ---------------------------------------------------------------------------------

def _read_folder(path: str, what: str, variant: str | None) -> tuple[dict, dict]:
    """(config dict, state dict) of a transformers model folder: config.json plus
    model.safetensors (numpy reader, no pickle) or pytorch_model.bin (tensors only)."""
    path = os.path.expanduser(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{what}: {path} has no config.json; expected a transformers "
                                "model folder (config.json and model.safetensors)")
    with open(config_path) as f:
        config = json.load(f)
    infix = f".{variant}" if variant else ""
    safetensors = os.path.join(path, f"model{infix}.safetensors")
    torch_file = os.path.join(path, f"pytorch_model{infix}.bin")
    if os.path.isfile(safetensors):
        from safetensors.numpy import load_file
        return config, load_file(safetensors)
    if os.path.isfile(torch_file):
        return config, load_torch_state_dict(torch_file, what)
    raise FileNotFoundError(f"{what}: {path} has neither {os.path.basename(safetensors)} nor "
                            f"{os.path.basename(torch_file)} (sharded checkpoints are not read)")


def load_clip_text_folder(path: str, variant: str | None = None) -> tuple[dict, dict]:
    """(TextTransformer kwargs, params) from a diffusers `text_encoder/` folder (or any
    CLIPTextModel[WithProjection] save_pretrained folder); `variant="fp16"` reads
    model.fp16.safetensors. Params are float32."""
    config, state_dict = _read_folder(path, "CLIP text model", variant)
    kwargs = clip_text_config_to_kwargs(config)
    return kwargs, clip_text_state_dict_to_params(state_dict, kwargs)


def load_clip_vision_folder(path: str, variant: str | None = None) -> tuple[dict, dict]:
    """(VisionTransformer kwargs, params) from a diffusers `image_encoder/` folder."""
    config, state_dict = _read_folder(path, "CLIP vision model", variant)
    kwargs = clip_vision_config_to_kwargs(config)
    return kwargs, clip_vision_state_dict_to_params(state_dict, kwargs)
