"""Load diffusers `AutoencoderKL` weights (e.g. the SD VAE) into our `AutoencoderKL`.

Tensor layouts and the attention projections convert as for the U-Net (diffusers_unet2d);
this module adds the VAE's module names and config. Every target parameter is filled exactly
once from exactly one source tensor and every source tensor must be used, so a config
mismatch cannot load silently.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from ldm_jax.convert.diffusers_unet2d import _convert_leaf, normalise_keys
from ldm_jax.models.autoencoder import AutoencoderKL, downsampling_factor

# AutoencoderKL.__init__ defaults for the config keys we read (a config.json may omit them).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

_SUBMODULES = {"skip": "conv_shortcut", "norm": "group_norm"}


def autoencoder_kl_config_to_model_kwargs(diffusers_config: dict) -> dict:
    """Our `AutoencoderKL` keyword arguments for a diffusers AutoencoderKL config (config.json
    as a dict). Raises ValueError for anything our autoencoder cannot represent."""
    cfg = {**_DIFFUSERS_DEFAULTS, **diffusers_config}
    name = cfg.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise ValueError(f"expected an AutoencoderKL config, got _class_name={name!r}")
    for key, want in (("act_fn", "silu"), ("use_quant_conv", True), ("use_post_quant_conv", True),
                      ("mid_block_add_attention", True)):
        if cfg[key] != want:
            raise ValueError(f"unsupported AutoencoderKL config: {key}={cfg[key]!r} "
                             f"(our AutoencoderKL supports only {want!r})")

    channels = list(cfg["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first width")
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not (len(down) == len(up) == len(channels)):
        raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    for kind, plain, attn in ((down, "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                              (up, "UpDecoderBlock2D", "AttnUpDecoderBlock2D")):
        bad = sorted(set(kind) - {plain, attn})
        if bad:
            raise ValueError(f"unsupported block types {bad}; only {plain} and {attn} convert")
    down_attn = [t == "AttnDownEncoderBlock2D" for t in down]
    up_attn = [t == "AttnUpDecoderBlock2D" for t in reversed(up)]  # up_blocks[0] is the deepest
    if down_attn != up_attn:
        raise ValueError(f"attention levels differ between down {down} and up {up} blocks; our "
                         "AutoencoderKL puts attention at the same resolutions in both halves")

    size = cfg["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square sample_size {size} is unsupported")
        size = size[0]
    return {
        "ch": ch,
        "ch_mult": tuple(c // ch for c in channels),
        "num_res_blocks": cfg["layers_per_block"],
        # Attention is placed by level; sample_size only names the levels' resolutions.
        "attn_resolutions": tuple(size // 2 ** i for i, a in enumerate(down_attn) if a),
        "z_channels": cfg["latent_channels"],
        "in_channels": cfg["in_channels"],
        "out_channels": cfg["out_channels"],
        "resolution": size,
        "norm_groups": cfg["norm_num_groups"],
    }


def latent_scaling(diffusers_config: dict) -> dict:
    """How diffusion latents relate to the autoencoder's: z_diffusion = (z - shift) * scale."""
    cfg = {**_DIFFUSERS_DEFAULTS, **diffusers_config}
    return {"scaling_factor": float(cfg["scaling_factor"]),
            "shift_factor": float(cfg["shift_factor"] or 0.0)}


def _source_module(path: tuple[str, ...], num_levels: int) -> str:
    """diffusers module prefix for one of our module paths (submodule names included)."""
    half, top, *rest = path if path[0] in ("encoder", "decoder") else ("", *path)

    def deep(level):  # diffusers' up_blocks run deepest first
        return num_levels - 1 - int(level)

    patterns = (
        (r"down(\d+)_res(\d+)", lambda l, i: f"down_blocks.{l}.resnets.{i}"),
        (r"down(\d+)_attn(\d+)", lambda l, i: f"down_blocks.{l}.attentions.{i}"),
        (r"down(\d+)_downsample", lambda l: f"down_blocks.{l}.downsamplers.0"),
        (r"up(\d+)_res(\d+)", lambda l, i: f"up_blocks.{deep(l)}.resnets.{i}"),
        (r"up(\d+)_attn(\d+)", lambda l, i: f"up_blocks.{deep(l)}.attentions.{i}"),
        (r"up(\d+)_upsample", lambda l: f"up_blocks.{deep(l)}.upsamplers.0"),
        (r"mid_res(\d+)", lambda i: f"mid_block.resnets.{i}"),
        (r"mid_attn", lambda: "mid_block.attentions.0"),
        (r"norm_out", lambda: "conv_norm_out"),
        (r"(conv_in|conv_out|quant_conv|post_quant_conv)", lambda n: n),
    )
    for pattern, fmt in patterns:
        m = re.fullmatch(pattern, top)
        if m:
            parts = [half] if half else []
            return ".".join(parts + [fmt(*m.groups())] + [_SUBMODULES.get(r, r) for r in rest])
    raise KeyError(f"no diffusers counterpart for our module {'/'.join(path)}")


def _linear_attention_weights(sd: dict) -> dict:
    """Old CompVis-converted checkpoints keep the attention projections as 1x1 conv kernels
    (out, in, 1, 1); they are linear maps, so drop the unit spatial dims."""
    return {k: v.reshape(v.shape[:2]) if ".attentions." in k and v.ndim == 4 and v.shape[2:] == (1, 1)
            else v for k, v in sd.items()}


def expected_param_shapes(model_kwargs: dict) -> dict:
    """Our AutoencoderKL's parameter shapes, computed abstractly (no weights allocated)."""
    model = AutoencoderKL(**model_kwargs)
    f = downsampling_factor(model.ch_mult)
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    return jax.tree_util.tree_map(lambda s: s.shape, variables["params"])


def autoencoder_kl_state_dict_to_params(state_dict: dict, model_kwargs: dict) -> dict:
    """Flax params for `AutoencoderKL(**model_kwargs)` from a diffusers AutoencoderKL state dict
    (name -> torch tensor or array). Raises KeyError naming a missing source key, ValueError
    naming a mis-shaped or unused one."""
    sd = _linear_attention_weights(normalise_keys(state_dict))
    shapes = traverse_util.flatten_dict(expected_param_shapes(model_kwargs))
    num_levels = len(AutoencoderKL(**model_kwargs).ch_mult)
    used: set[str] = set()

    def fetch(prefix):
        def take(suffix):
            key = f"{prefix}.{suffix}"
            if key not in sd:
                raise KeyError(f"missing source key {key!r}")
            if key in used:
                raise ValueError(f"source key {key!r} would fill two parameters")
            used.add(key)
            return sd[key]
        return take

    flat = {}
    for path, shape in shapes.items():
        module, leaf = path[:-1], path[-1]
        prefix = _source_module(tuple(p for p in module if p not in ("qkv", "proj_out")), num_levels)
        # jnp.array copies, so the result never aliases the caller's (e.g. torch) buffers.
        flat[path] = jnp.array(_convert_leaf(prefix, module, leaf, shape, fetch(prefix)))
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"unexpected source keys (config mismatch?): {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return traverse_util.unflatten_dict(flat)


def load_autoencoder_kl(path: str) -> tuple[dict, dict]:
    """(params, AutoencoderKL kwargs) from a diffusers AutoencoderKL folder: config.json plus
    diffusion_pytorch_model.safetensors. Uses safetensors' numpy reader (no torch, no pickle).
    The latent scale factor is in `latent_scaling(config)`."""
    from safetensors.numpy import load_file

    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} not found; pass a diffusers AutoencoderKL folder "
                                "(e.g. <model>/vae)")
    with open(config_path) as f:
        kwargs = autoencoder_kl_config_to_model_kwargs(json.load(f))
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found; only .safetensors weights are read "
                                "(pickled .bin files are refused)")
    return autoencoder_kl_state_dict_to_params(load_file(weights), kwargs), kwargs
