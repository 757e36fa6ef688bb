"""An ldm-jax text-to-image model -> a diffusers Stable Diffusion folder, so models trained or
fine-tuned here run in the PyTorch world (StableDiffusionPipeline.from_pretrained).

Each part is the exact inverse of its reader (diffusers_unet2d_condition, diffusers_autoencoder,
clip_weights): a folder read and written back holds identical tensors. The text encoder must be
CLIP-shaped and the tokenizer CLIP's BPE one; a jointly trained word-level encoder has no
diffusers counterpart and is refused.
"""
from __future__ import annotations

import json
import os

import numpy as np
from flax import traverse_util

from ldm_jax.config_checks import ConfigError

DIFFUSERS_VERSION = "0.30.0"  # the oldest layout these files follow; newer versions read it
_PREDICTION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def _np(tree) -> dict:
    return {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(tree).items()}


# -- U-Net ----------------------------------------------------------------------------------

def unet_config(unet, sample_size: int) -> dict:
    """A UNet2DConditionModel config.json for our `UNet` module (its fields)."""
    levels = len(unet.channel_mult)
    widths = [unet.base_channels * m for m in unet.channel_mult]
    per_level = lambda v: list(v) if isinstance(v, (list, tuple)) else [v] * levels
    head_dims, heads = per_level(unet.head_dim), per_level(unet.num_heads)
    heads = [w // d if d else n for w, d, n in zip(widths, head_dims, heads)]
    depth = per_level(unet.transformer_depth)
    attn = [lv in unet.attention_levels for lv in range(levels)]
    return {
        "_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size, "in_channels": unet.in_channels,
        "out_channels": unet.out_channels, "block_out_channels": widths,
        "layers_per_block": unet.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        # diffusers' historical name for the number of heads
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
        "cross_attention_dim": unet.context_dim,
        "use_linear_projection": bool(unet.use_linear_projection),
        "norm_num_groups": unet.norm_groups, "norm_eps": unet.norm_eps,
        "downsample_padding": unet.downsample_padding, "flip_sin_to_cos": unet.flip_sin_to_cos,
        "freq_shift": int(unet.freq_shift), "act_fn": "silu", "center_input_sample": False,
        "dropout": float(unet.dropout),
    }


def _unet_tensor(path: tuple, value: np.ndarray) -> np.ndarray:
    """Inverse of diffusers_unet2d_condition._to_flax for one of our parameters."""
    if path[-1] != "kernel":  # biases and norm scales keep their shape
        return value
    module = path[-2]
    if module in ("to_q", "to_k", "to_v"):  # (in, heads, head_dim)
        return value.reshape(value.shape[0], -1).T
    if module == "to_out":  # (heads, head_dim, out)
        return value.reshape(-1, value.shape[-1]).T
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T


def unet_state_dict(params, model_kwargs: dict) -> dict:
    from ldm_jax.convert.diffusers_unet2d_condition import source_keys
    flat = _np(params)
    keys = source_keys(model_kwargs, {k: v.shape for k, v in flat.items()})
    return {keys[path]: np.ascontiguousarray(_unet_tensor(path, v)) for path, v in flat.items()}


def unet_kwargs(unet) -> dict:
    """The converter's keyword arguments of a UNet module (what source_keys reads)."""
    return {"channel_mult": tuple(unet.channel_mult), "in_channels": unet.in_channels,
            "context_dim": unet.context_dim}


# -- VAE ------------------------------------------------------------------------------------

def vae_config(model, scale: float, sample_size: int) -> dict:
    widths = [model.ch * m for m in model.ch_mult]
    levels = len(widths)
    if model.attn_resolutions:
        raise ConfigError("the first stage has attention outside its middle block "
                          f"(attn_resolutions={tuple(model.attn_resolutions)}); diffusers' "
                          "AutoencoderKL as Stable Diffusion uses it has none")
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": model.in_channels, "out_channels": model.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": widths, "layers_per_block": model.num_res_blocks,
        "act_fn": "silu", "latent_channels": model.z_channels,
        "norm_num_groups": model.norm_groups, "sample_size": sample_size,
        "scaling_factor": float(scale),
    }


def vae_state_dict(params, model) -> dict:
    """Inverse of diffusers_autoencoder.autoencoder_kl_state_dict_to_params."""
    from ldm_jax.convert.diffusers_autoencoder import _source_module
    levels = len(model.ch_mult)
    out = {}
    for path, value in _np(params).items():
        module, leaf = path[:-1], path[-1]
        prefix = _source_module(tuple(p for p in module if p not in ("qkv", "proj_out")), levels)
        suffix = "weight" if leaf in ("kernel", "scale") else "bias"
        if module[-1] == "qkv":  # kernel (in, 3, heads, hd), bias (3, heads, hd)
            for i, name in enumerate(("to_q", "to_k", "to_v")):
                part = value[:, i] if leaf == "kernel" else value[i]
                part = part.reshape(part.shape[0], -1).T if leaf == "kernel" else part.reshape(-1)
                out[f"{prefix}.{name}.{suffix}"] = part
            continue
        if module[-1] == "proj_out":  # kernel (heads, hd, out)
            key = f"{prefix}.to_out.0.{suffix}"
            value = value.reshape(-1, value.shape[-1]).T if leaf == "kernel" else value
        else:
            key = f"{prefix}.{suffix}"
            if leaf == "kernel":
                value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        out[key] = value
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- text, tokenizer, scheduler ---------------------------------------------------------------

def text_parts(module, params, output: str) -> tuple:
    """(config, state dict) of a CLIPTextModel. An encoder read at its penultimate layer is
    written without its last layer, as diffusers' SD 2 folders are."""
    from ldm_jax.convert import clip_weights
    if not module.causal or module.activation not in ("quick_gelu", "gelu"):
        raise ConfigError("only CLIP text encoders (causal, quick_gelu or gelu) export to "
                          "diffusers; this model's encoder was trained with it here")
    depth = module.depth
    params = dict(params)
    if output == "penultimate":
        params.pop(f"layers_{depth - 1}")
        depth -= 1
    kwargs = {"vocab_size": module.vocab_size, "max_length": module.max_length,
              "width": module.width, "depth": depth, "heads": module.heads,
              "mlp_ratio": module.mlp_ratio, "activation": module.activation,
              "causal": True, "layer_norm_eps": module.layer_norm_eps}
    config = {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "vocab_size": module.vocab_size, "max_position_embeddings": module.max_length,
        "hidden_size": module.width, "intermediate_size": module.mlp_ratio * module.width,
        "num_hidden_layers": depth, "num_attention_heads": module.heads,
        "hidden_act": module.activation, "layer_norm_eps": module.layer_norm_eps,
        "projection_dim": module.width, "torch_dtype": "float32",
    }
    return config, clip_weights.clip_text_params_to_state_dict(params, kwargs)


def scheduler_config(config) -> dict:
    d, s = config.diffusion, config.sampling
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "beta_start": d.beta_start, "beta_end": d.beta_end, "beta_schedule": d.schedule,
            "num_train_timesteps": d.num_timesteps,
            "prediction_type": _PREDICTION[d.parameterization],
            "steps_offset": s.steps_offset, "set_alpha_to_one": s.set_alpha_to_one,
            "skip_prk_steps": True, "timestep_spacing": s.spacing}


MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
    "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "safety_checker": [None, None], "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _write_weights(path: str, sd: dict) -> None:
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(sd, path)


def write_diffusers(config, loaded, dst: str) -> str:
    """A diffusers folder at `dst` (which must not exist or be empty) from a loaded model
    (stable_diffusion.load.load)."""
    from ldm_jax.data import clip_tokenizer
    if os.path.exists(dst) and os.listdir(dst):
        raise ConfigError(f"{dst} exists and is not empty; choose a new folder")
    model, first, tok = loaded.model, loaded.first, loaded.tok
    if model.text_encoder is None or not clip_tokenizer.is_clip(tok):
        raise ConfigError("only text-to-image models with a CLIP text encoder and tokenizer "
                          "(Stable Diffusion and models fine-tuned from it) export to diffusers")
    if first.kind != "kl":
        raise ConfigError("only KL first stages export to diffusers (AutoencoderKL)")
    if config.conditioning.concat not in ("none", "inpaint") or model.class_embedder is not None \
            or model.unet.label_sizes:
        raise ConfigError("label- or super-resolution-conditioned models have no Stable "
                          "Diffusion pipeline to export to")
    latent_size = config.data.image_size // first.factor
    params = loaded.params
    _write_json(os.path.join(dst, "unet", "config.json"), unet_config(model.unet, latent_size))
    _write_weights(os.path.join(dst, "unet", "diffusion_pytorch_model.safetensors"),
                   unet_state_dict(params["unet"], unet_kwargs(model.unet)))
    vae_params = first.params["params"]["autoencoder"]
    _write_json(os.path.join(dst, "vae", "config.json"),
                vae_config(first.model, first.scale, config.data.image_size))
    _write_weights(os.path.join(dst, "vae", "diffusion_pytorch_model.safetensors"),
                   vae_state_dict(vae_params, first.model))
    text_cfg, text_sd = text_parts(model.text_encoder, params["text_encoder"],
                                   model.text_output)
    text_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    _write_json(os.path.join(dst, "text_encoder", "config.json"), text_cfg)
    _write_weights(os.path.join(dst, "text_encoder", "model.safetensors"), text_sd)
    clip_tokenizer.write_vocab_files(tok, os.path.join(dst, "tokenizer"))
    _write_json(os.path.join(dst, "scheduler", "scheduler_config.json"),
                scheduler_config(config))
    _write_json(os.path.join(dst, "model_index.json"), MODEL_INDEX)
    return dst
