"""Load diffusers `UNet2DModel` weights (e.g. google/ddpm-cifar10-32) into our `UNet`.

PyTorch keeps conv kernels as OIHW and linear weights as (out, in); Flax wants HWIO and
(in, out). Attention's separate query/key/value projections become our single `qkv`
DenseGeneral. Every target parameter must be filled exactly once from exactly one source
tensor, and every source tensor must be used, so a config mismatch cannot load silently.
"""
from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.models.unet import UNet

# UNet2DModel.__init__ defaults for the config keys we read (a config.json may omit them).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True, "mid_block_type": "UNetMidBlock2D", "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "sample_size": None,
}

# Names used by checkpoints saved before diffusers' Attention refactor.
_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_SUBMODULES = {"time_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm"}


def unet2d_config_to_model_kwargs(diffusers_config: dict, image_size: int | None = None) -> dict:
    """Our `UNet` keyword arguments for a diffusers UNet2DModel config (config.json as a dict).

    `image_size` is needed only when the config has no `sample_size`. Raises ValueError for
    anything our U-Net cannot represent.
    """
    cfg = {**_DIFFUSERS_DEFAULTS, **diffusers_config}
    name = cfg.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(f"expected a UNet2DModel config, got _class_name={name!r}")
    required = {"center_input_sample": False, "time_embedding_type": "positional",
                "flip_sin_to_cos": False, "freq_shift": 1, "mid_block_type": "UNetMidBlock2D",
                "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
                "act_fn": "silu", "resnet_time_scale_shift": "default", "add_attention": True,
                "class_embed_type": None, "num_class_embeds": None}
    for key, want in required.items():
        if cfg[key] != want:
            raise ValueError(f"unsupported UNet2DModel config: {key}={cfg[key]!r} "
                             f"(our UNet supports only {want!r})")

    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first width")
    if cfg["time_embedding_dim"] not in (None, 4 * base):
        raise ValueError(f"time_embedding_dim={cfg['time_embedding_dim']} unsupported "
                         f"(our UNet uses 4 * {base})")
    if cfg["attn_norm_num_groups"] not in (None, cfg["norm_num_groups"]):
        raise ValueError("attn_norm_num_groups different from norm_num_groups is unsupported")

    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    if not (len(down) == len(up) == len(channels)):
        raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
    for kind, plain, attn in ((down, "DownBlock2D", "AttnDownBlock2D"),
                              (up, "UpBlock2D", "AttnUpBlock2D")):
        bad = sorted(set(kind) - {plain, attn})
        if bad:
            raise ValueError(f"unsupported block types {bad}; only {plain} and {attn} convert")
    down_attn = [t == "AttnDownBlock2D" for t in down]
    # up_blocks[i] runs at the resolution of down level len-1-i.
    up_attn = [t == "AttnUpBlock2D" for t in reversed(up)]
    if down_attn != up_attn:
        raise ValueError(f"attention levels differ between down {down} and up {up} blocks; our "
                         "UNet puts attention at the same resolutions on both paths")

    size = cfg["sample_size"] if cfg["sample_size"] is not None else image_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square sample_size {size} is unsupported")
        size = size[0]
    if size is None:
        raise ValueError("the config has no sample_size; pass image_size")
    head_dim = cfg["attention_head_dim"]
    return {
        "base_channels": base,
        "channel_mult": tuple(c // base for c in channels),
        "num_res_blocks": cfg["layers_per_block"],
        "attention_resolutions": tuple(size // 2 ** i for i, a in enumerate(down_attn) if a),
        # None means one head spanning all channels at every level.
        "num_heads": 1,
        "head_dim": head_dim,
        "dropout": float(cfg["dropout"]),
        "norm_groups": cfg["norm_num_groups"],
        "norm_eps": float(cfg["norm_eps"]),
        "downsample_padding": cfg["downsample_padding"],
        "out_channels": cfg["out_channels"],
    }


def source_module(path: tuple[str, ...], num_levels: int) -> str:
    """diffusers module prefix for one of our module paths (top-level name + submodules)."""
    top, *rest = path
    patterns = (
        (r"down(\d+)_res(\d+)", lambda l, i: f"down_blocks.{l}.resnets.{i}"),
        (r"down(\d+)_attn(\d+)", lambda l, i: f"down_blocks.{l}.attentions.{i}"),
        (r"down(\d+)_downsample", lambda l: f"down_blocks.{l}.downsamplers.0"),
        (r"up(\d+)_res(\d+)", lambda l, i: f"up_blocks.{num_levels - 1 - int(l)}.resnets.{i}"),
        (r"up(\d+)_attn(\d+)", lambda l, i: f"up_blocks.{num_levels - 1 - int(l)}.attentions.{i}"),
        (r"up(\d+)_upsample", lambda l: f"up_blocks.{num_levels - 1 - int(l)}.upsamplers.0"),
        (r"mid_res(\d+)", lambda i: f"mid_block.resnets.{i}"),
        (r"mid_attn", lambda: "mid_block.attentions.0"),
        (r"time_dense([12])", lambda i: f"time_embedding.linear_{i}"),
        (r"norm_out", lambda: "conv_norm_out"),
        (r"(conv_in|conv_out)", lambda n: n),
    )
    for pattern, fmt in patterns:
        m = re.fullmatch(pattern, top)
        if m:
            return ".".join([fmt(*m.groups())] + [_SUBMODULES.get(r, r) for r in rest])
    raise KeyError(f"no diffusers counterpart for our module {'/'.join(path)}")


def normalise_keys(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-2] in _LEGACY_ATTN and "attentions" in parts:
            key = ".".join(parts[:-2] + [_LEGACY_ATTN[parts[-2]], parts[-1]])
        if key in out:
            raise ValueError(f"state dict holds both the legacy and current name for {key}")
        if hasattr(value, "detach"):  # a torch tensor; float() first since numpy has no bf16
            value = value.detach().float().cpu().numpy()
        out[key] = np.asarray(value, dtype=np.float32)
    return out


def _convert_leaf(prefix: str, module: tuple[str, ...], leaf: str, shape, take) -> np.ndarray:
    """Our parameter `leaf` of `module` from the source tensors `prefix`.* fetched by `take`."""
    kind, suffix = module[-1], "weight" if leaf in ("kernel", "scale") else "bias"
    if kind == "qkv":
        names = [f"{p}.{suffix}" for p in ("to_q", "to_k", "to_v")]
        tensors = [take(n) for n in names]
        shapes = [w.shape for w in tensors]
        if len(set(shapes)) != 1:
            raise ValueError(f"shape mismatch: {[f'{prefix}.{n}' for n in names]} have shapes {shapes}")
        # 3 x (out, in) -> (in, 3, out); 3 x (out,) -> (3, out). Heads are the leading
        # channel blocks of `out` in both libraries, so the head split is a plain reshape.
        value = np.stack([w.T for w in tensors], axis=1) if leaf == "kernel" else np.stack(tensors)
        want = (shape[0], 3, shape[2] * shape[3]) if leaf == "kernel" else (3, shape[1] * shape[2])
    else:
        names = ["to_out.0." + suffix] if kind == "proj_out" else [suffix]
        value = take(names[0])
        if leaf == "kernel":  # conv OIHW -> HWIO, linear (out, in) -> (in, out)
            value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
        want = (shape[0] * shape[1], shape[2]) if kind == "proj_out" and leaf == "kernel" else tuple(shape)
    if value.shape != want:
        keys = [f"{prefix}.{n}" for n in names]
        raise ValueError(f"shape mismatch for source {keys} -> our {'/'.join(module)}/{leaf}: "
                         f"converted source has shape {value.shape}, expected {want}")
    return value.reshape(shape)


def expected_param_shapes(model_kwargs: dict, image_size: int, in_channels: int) -> dict:
    """Our UNet's parameter shapes, computed abstractly (no weights allocated)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    variables = jax.eval_shape(UNet(**model_kwargs).init, jax.random.key(0), x, t)
    return jax.tree_util.tree_map(lambda s: s.shape, variables["params"])


def unet2d_state_dict_to_params(state_dict: dict, *, num_res_blocks: int, channel_mult,
                                attention_resolutions, image_size: int, num_heads: int = 1,
                                head_dim: int | None = None) -> dict:
    """Flax params for our `UNet` from a UNet2DModel state dict (name -> array-like).

    Base width and in/out channels are read from conv_in / conv_out. Raises KeyError naming
    a missing source key, ValueError naming a mis-shaped or unused one.
    """
    sd = normalise_keys(state_dict)
    if "conv_in.weight" not in sd or "conv_out.weight" not in sd:
        raise KeyError("state dict lacks conv_in.weight or conv_out.weight; is it a UNet2DModel?")
    base, in_ch = sd["conv_in.weight"].shape[:2]
    kwargs = dict(base_channels=int(base), channel_mult=tuple(channel_mult),
                  num_res_blocks=num_res_blocks, attention_resolutions=tuple(attention_resolutions),
                  num_heads=num_heads, head_dim=head_dim,
                  out_channels=int(sd["conv_out.weight"].shape[0]))
    shapes = traverse_util.flatten_dict(expected_param_shapes(kwargs, image_size, int(in_ch)))

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
        prefix = source_module(tuple(p for p in module if p not in ("qkv", "proj_out")),
                                len(channel_mult))
        # jnp.array always copies, so the result never aliases the caller's (e.g. torch) buffers.
        flat[path] = jnp.array(_convert_leaf(prefix, module, leaf, shape, fetch(prefix)))
    unused = sorted(set(sd) - used)
    if unused:
        raise ValueError(f"unexpected source keys (config mismatch?): {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")
    return traverse_util.unflatten_dict(flat)


def load_unet2d_params(path: str, image_size: int | None = None) -> tuple[dict, dict]:
    """(params, UNet kwargs) from a diffusers UNet2DModel folder: config.json plus
    diffusion_pytorch_model.safetensors. Uses safetensors' numpy reader (no pickle)."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    kwargs = unet2d_config_to_model_kwargs(config, image_size)
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} not found; only .safetensors weights are read "
                                "(pickled .bin files are refused)")
    size = config.get("sample_size") or image_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    params = unet2d_state_dict_to_params(
        load_file(weights), num_res_blocks=kwargs["num_res_blocks"],
        channel_mult=kwargs["channel_mult"], attention_resolutions=kwargs["attention_resolutions"],
        image_size=size, num_heads=kwargs["num_heads"], head_dim=kwargs["head_dim"])
    return params, kwargs
