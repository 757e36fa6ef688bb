"""Load diffusers `UNet2DConditionModel` weights (Stable Diffusion v1/v2 U-Nets) into our `UNet`
configured with cross-attention (`context_dim`).

The config gives our UNet keyword arguments; the weights map one-to-one: every parameter of
the configured UNet is filled from exactly one source tensor and every source tensor is used,
so a config that does not match the weights fails, naming the keys.
"""
from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.convert.diffusers_unet2d import normalise_keys, source_module
from ldm_jax.models.unet import UNet

# UNet2DConditionModel.__init__ defaults of the keys we read or refuse (config.json may omit them).
_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "attention_head_dim": 8, "num_attention_heads": None,
    "dual_cross_attention": False, "use_linear_projection": False, "class_embed_type": None,
    "addition_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "projection_class_embeddings_input_dim": None,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}

# Settings our UNet does not implement; any other value is refused rather than mis-converted.
_REQUIRED = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False, "mid_block_scale_factor": 1, "act_fn": "silu",
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "dual_cross_attention": False, "addition_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}

# Our transformer submodule names -> diffusers' (GEGLU's projection and the output Linear sit
# at indices 0 and 2 of diffusers' FeedForward.net; its attention output at to_out.0).
_TRANSFORMER_NAMES = {"proj": "net.0.proj", "out": "net.2", "to_out": "to_out.0"}
_RESNET_NAMES = {"time_proj": "time_emb_proj", "skip": "conv_shortcut"}
# class_embed_type="projection" is diffusers' TimestepEmbedding applied to a vector.
_VECTOR_NAMES = {"dense1": "linear_1", "dense2": "linear_2"}


def _same_for_all_levels(cfg: dict, key: str, levels: int):
    value = cfg[key]
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{key}={value} has {len(value)} entries for {levels} levels")
        if len(set(value)) != 1:
            raise ValueError(f"per-level {key}={value} is unsupported (our UNet uses one value)")
        value = value[0]
    return value


def _per_level(cfg: dict, key: str, levels: int):
    value = cfg[key]
    if isinstance(value, (list, tuple)):
        if len(value) != levels or not all(isinstance(v, int) for v in value):
            raise ValueError(f"{key}={value} must be an int or one int per level ({levels})")
        return tuple(value)
    return value


def unet2d_condition_config_to_model_kwargs(diffusers_config: dict) -> dict:
    """Our `UNet` keyword arguments for a diffusers UNet2DConditionModel config (a dict).

    Raises ValueError naming any setting our U-Net cannot represent.
    """
    cfg = {**_DEFAULTS, **diffusers_config}
    name = cfg.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ValueError(f"expected a UNet2DConditionModel config, got _class_name={name!r}")
    for key, want in _REQUIRED.items():
        if cfg[key] != want:
            raise ValueError(f"unsupported UNet2DConditionModel config: {key}={cfg[key]!r} "
                             f"(our UNet supports only {want!r})")

    if cfg["class_embed_type"] not in (None, "projection"):
        raise ValueError(f"unsupported UNet2DConditionModel config: class_embed_type="
                         f"{cfg['class_embed_type']!r} (our UNet supports None and 'projection')")
    vector_dim = None
    if cfg["class_embed_type"] == "projection":
        vector_dim = cfg["projection_class_embeddings_input_dim"]
        if vector_dim is None:
            raise ValueError("class_embed_type='projection' needs "
                             "projection_class_embeddings_input_dim")
    channels = list(cfg["block_out_channels"])
    levels, base = len(channels), channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first width")
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise ValueError(f"time_embedding_dim={cfg['time_embedding_dim']} unsupported "
                         f"(our UNet uses 4 * {base})")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not (len(down) == len(up) == levels):
        raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    for kinds, plain, attn in ((down, "DownBlock2D", "CrossAttnDownBlock2D"),
                               (up, "UpBlock2D", "CrossAttnUpBlock2D")):
        bad = sorted(set(kinds) - {plain, attn})
        if bad:
            raise ValueError(f"unsupported block types {bad}; only {plain} and {attn} convert")
    down_attn = [t == "CrossAttnDownBlock2D" for t in down]
    up_attn = [t == "CrossAttnUpBlock2D" for t in reversed(up)]  # up_blocks[i] is level levels-1-i
    if down_attn != up_attn:
        raise ValueError(f"attention levels differ between down {down} and up {up} blocks; our "
                         "UNet puts attention at the same levels on both paths")
    # diffusers' `attention_head_dim` is, for historical reasons, the number of heads.
    cfg["attention_head_dim"] = cfg["num_attention_heads"] or cfg["attention_head_dim"]
    return {
        "base_channels": base,
        "channel_mult": tuple(c // base for c in channels),
        "num_res_blocks": _same_for_all_levels(cfg, "layers_per_block", levels),
        "attention_resolutions": (),
        "attention_levels": tuple(i for i, a in enumerate(down_attn) if a),
        "num_heads": _per_level(cfg, "attention_head_dim", levels),
        "head_dim": None,
        "dropout": float(cfg["dropout"]),
        "norm_groups": cfg["norm_num_groups"],
        "norm_eps": float(cfg["norm_eps"]),
        "downsample_padding": cfg["downsample_padding"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "freq_shift": float(cfg["freq_shift"]),
        "flip_sin_to_cos": bool(cfg["flip_sin_to_cos"]),
        "context_dim": _same_for_all_levels(cfg, "cross_attention_dim", levels),
        "transformer_depth": _per_level(cfg, "transformer_layers_per_block", levels),
        "use_linear_projection": bool(cfg["use_linear_projection"]),
        "vector_dim": vector_dim,
    }


def expected_param_shapes(model_kwargs: dict) -> dict:
    """Our UNet's parameter shapes, computed abstractly at the smallest valid input size."""
    size = 2 ** (len(model_kwargs["channel_mult"]) - 1)
    x = jax.ShapeDtypeStruct((1, size, size, model_kwargs["in_channels"]), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 1, model_kwargs["context_dim"]), jnp.float32)
    vdim = model_kwargs.get("vector_dim")
    vec = None if vdim is None else jax.ShapeDtypeStruct((1, vdim), jnp.float32)
    variables = jax.eval_shape(
        lambda *a: UNet(**model_kwargs).init(jax.random.key(0), *a[:2], context=a[2],
                                             vector=a[3]), x, t, ctx, vec)
    return jax.tree_util.tree_map(lambda s: s.shape, variables["params"])


def _source_key(path: tuple[str, ...], levels: int) -> str:
    """diffusers state-dict key of our parameter `path` (module names..., leaf)."""
    top, *rest, leaf = path
    if top == "vector_embedding":
        return ".".join(["class_embedding", *(_VECTOR_NAMES.get(p, p) for p in rest),
                         "weight" if leaf == "kernel" else "bias"])
    prefix = source_module((top,), levels)
    is_transformer = re.fullmatch(r"(down\d+_attn\d+|up\d+_attn\d+|mid_attn)", top)
    names = []
    for part in rest:
        m = re.fullmatch(r"block(\d+)", part)
        if is_transformer and m:
            names.append(f"transformer_blocks.{m.group(1)}")
        else:
            names.append((_TRANSFORMER_NAMES if is_transformer else _RESNET_NAMES).get(part, part))
    suffix = "weight" if leaf in ("kernel", "scale", "embedding") else "bias"
    return ".".join([prefix, *names, suffix])


def _to_flax(value: np.ndarray, path: tuple[str, ...], shape: tuple, key: str) -> np.ndarray:
    if path[-1] == "kernel":
        if value.ndim == 4:  # conv OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:  # linear (out, in) -> (in, out)
            value = value.T
        module = path[-2]
        # DenseGeneral kernels: q/k/v (in, heads, head_dim), the output (heads, head_dim, out).
        # Heads are the leading blocks of the flat channel axis in both libraries.
        if module in ("to_q", "to_k", "to_v"):
            want = (shape[0], math.prod(shape[1:]))
        elif module == "to_out":
            want = (math.prod(shape[:2]), shape[2])
        else:
            want = tuple(shape)
    else:
        want = tuple(shape)
    if value.shape != want:
        raise ValueError(f"shape mismatch for source {key!r} -> our {'/'.join(path)}: converted "
                         f"source has shape {value.shape}, expected {want}")
    return value.reshape(shape)


def source_keys(model_kwargs: dict, shapes: dict | None = None) -> dict:
    """{our flattened parameter path: its diffusers state-dict key} for `UNet(**model_kwargs)`."""
    if shapes is None:
        shapes = traverse_util.flatten_dict(expected_param_shapes(model_kwargs))
    levels = len(model_kwargs["channel_mult"])
    return {path: _source_key(path, levels) for path in shapes}


def unet2d_condition_state_dict_to_params(state_dict: dict, model_kwargs: dict) -> dict:
    """Flax params for `UNet(**model_kwargs)` from a UNet2DConditionModel state dict
    (name -> array-like). Raises KeyError naming missing source keys, ValueError naming
    mis-shaped or unused ones."""
    sd = normalise_keys(state_dict)
    shapes = traverse_util.flatten_dict(expected_param_shapes(model_kwargs))
    keys = source_keys(model_kwargs, shapes)
    missing = sorted(set(keys.values()) - set(sd))
    if missing:
        raise KeyError(f"missing source keys (config mismatch?): {missing[:8]}"
                       f"{' ...' if len(missing) > 8 else ''}")
    if len(set(keys.values())) != len(keys):
        raise ValueError("internal error: two of our parameters map to one source key")
    unused = sorted(set(sd) - set(keys.values()))
    if unused:
        raise ValueError(f"unexpected source keys (config mismatch?): {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    # jnp.array copies, so the result never aliases the caller's buffers.
    flat = {path: jnp.array(_to_flax(sd[key], path, shapes[path], key))
            for path, key in keys.items()}
    return traverse_util.unflatten_dict(flat)


def load_unet2d_condition_params(path: str) -> tuple[dict, dict]:
    """(params, UNet kwargs) from a diffusers UNet2DConditionModel folder (e.g. the `unet/`
    folder of a Stable Diffusion pipeline): config.json plus diffusion_pytorch_model.safetensors,
    read with safetensors' numpy reader (no pickle)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        kwargs = unet2d_condition_config_to_model_kwargs(json.load(f))
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found; only .safetensors weights are read "
                                "(pickled .bin files are refused)")
    return unet2d_condition_state_dict_to_params(load_file(weights), kwargs), kwargs
