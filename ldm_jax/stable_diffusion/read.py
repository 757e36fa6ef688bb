"""Stable Diffusion weights as they are published -> the parts of an ldm-jax latent-diffusion
model, in memory (`SDModel`): its config, U-Net, VAE and text-encoder params and tokenizer.

Two layouts are read:
  - a diffusers folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/, each with its
    config; weights as .safetensors, or .bin read with weights-only unpickling;
  - a CompVis single file (.ckpt or .safetensors; model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.*): its architecture is inferred from the tensor
    shapes, its EMA U-Net weights are used when it has them, and its tokenizer, which such a
    file does not hold, comes from a `tokenizer` folder (vocab.json + merges.txt).
The config is configs/sd_v1.py with every field the weights decide set from them, so
SD-family variants (per-level heads, per-level transformer depth, 9-channel inpainting
U-Nets) load without a config file of their own. torch and safetensors are used here only.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import ml_collections
import numpy as np

from ldm_jax.config_checks import ConfigError

PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Our U-Net's fixed settings in latent models (ldm_step.build_model); a U-Net needing others
# cannot be expressed by an ldm config.
_FIXED_UNET = {"norm_eps": 1e-5, "downsample_padding": 1, "freq_shift": 0.0,
               "flip_sin_to_cos": True, "vector_dim": None}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_BETAS = {"scaled_linear": "scaled_linear", "linear": "linear"}


@dataclasses.dataclass
class SDModel:
    config: ml_collections.ConfigDict      # stage "ldm": U-Net, text, schedule, sampling
    vae_config: ml_collections.ConfigDict  # stage "autoencoder": the first stage
    unet: Any                              # U-Net params
    vae: Any                               # AutoencoderKL params
    text_kwargs: dict                      # TextTransformer fields
    text: Any                              # its params
    tokenizer: Any
    latent_scale: float
    source: str


def read(path: str, tokenizer: str | None = None, use_ema: bool = True,
         parameterization: str | None = None) -> SDModel:
    """A diffusers folder or a CompVis single file; `tokenizer` and `parameterization`
    (eps | v) are needed by single files only (their defaults are explained in the errors)."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        return read_diffusers(path)
    if os.path.isfile(path):
        return read_compvis(path, tokenizer, use_ema, parameterization)
    raise FileNotFoundError(f"{path} does not exist; pass a diffusers Stable Diffusion folder "
                            "or a CompVis .ckpt/.safetensors file")


# -- weight files ---------------------------------------------------------------------------

def read_safetensors(path: str) -> dict:
    """{name: float32 numpy array}; bf16 tensors (which numpy lacks) are read through torch."""
    from safetensors import SafetensorError
    try:
        from safetensors.numpy import load_file
        try:
            sd = load_file(path)
        except (TypeError, ValueError) as e:  # dtypes numpy has no type for, e.g. bfloat16
            if "bf16" not in str(e).lower() and "bfloat16" not in str(e).lower():
                raise
            from safetensors.torch import load_file as load_torch
            sd = {k: v.float().numpy() for k, v in load_torch(path).items()}
    except SafetensorError as e:
        raise ConfigError(f"{path} is not a readable safetensors file, perhaps truncated "
                          f"({str(e).splitlines()[0]}); download it again") from None
    return {k: np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v
            for k, v in sd.items()}


def read_weight_file(path: str) -> dict:
    """A .safetensors or a torch pickle (.bin/.ckpt/.pt, weights-only: no code runs)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    from ldm_jax.convert.torch_files import load_torch_state_dict
    try:
        sd = load_torch_state_dict(path)
    except (RuntimeError, EOFError, OSError) as e:  # torch's report of a truncated zip
        raise ConfigError(f"{path} is not a readable torch file, perhaps truncated "
                          f"({str(e).splitlines()[0]}); download it again") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return sd


def _part_weights(folder: str, part: str, stems: tuple) -> dict:
    names = [f"{s}{v}{ext}" for s in stems for v in ("", ".fp16")
             for ext in (".safetensors", ".bin")]
    for name in names:
        path = os.path.join(folder, part, name)
        if os.path.isfile(path):
            return read_weight_file(path)
    raise ConfigError(f"{os.path.join(folder, part)} holds no weights (looked for "
                      f"{', '.join(names[:2])} and .bin); the folder is incomplete")


def _json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{path} is missing; the folder is incomplete")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None


# -- diffusers folders ----------------------------------------------------------------------

def read_diffusers(folder: str) -> SDModel:
    from ldm_jax.convert import clip_weights
    from ldm_jax.convert.diffusers_autoencoder import (autoencoder_kl_config_to_model_kwargs,
                                                       autoencoder_kl_state_dict_to_params,
                                                       latent_scaling)
    from ldm_jax.convert.diffusers_unet2d_condition import (
        unet2d_condition_config_to_model_kwargs, unet2d_condition_state_dict_to_params)
    from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

    missing = [p for p in PARTS if not os.path.isdir(os.path.join(folder, p))]
    if missing:
        raise ConfigError(f"{folder} is not a complete diffusers Stable Diffusion folder: it has "
                          f"no {', '.join(p + '/' for p in missing)}")
    unet_cfg = _json(os.path.join(folder, "unet", "config.json"))
    vae_cfg = _json(os.path.join(folder, "vae", "config.json"))
    text_cfg = _json(os.path.join(folder, "text_encoder", "config.json"))
    sched_cfg = _json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    try:
        unet_kwargs = unet2d_condition_config_to_model_kwargs(unet_cfg)
        vae_kwargs = autoencoder_kl_config_to_model_kwargs(vae_cfg)
        text_kwargs = clip_weights.clip_text_config_to_kwargs(text_cfg)
        unet = unet2d_condition_state_dict_to_params(
            _part_weights(folder, "unet", ("diffusion_pytorch_model",)), unet_kwargs)
        vae = autoencoder_kl_state_dict_to_params(
            _part_weights(folder, "vae", ("diffusion_pytorch_model",)), vae_kwargs)
        text = clip_weights.clip_text_state_dict_to_params(
            _part_weights(folder, "text_encoder", ("model", "pytorch_model")), text_kwargs)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{folder}: {str(e).strip(chr(39))}") from None
    tok = load_clip_tokenizer(os.path.join(folder, "tokenizer"), text_kwargs["max_length"])
    scale = latent_scaling(vae_cfg)
    if scale["shift_factor"]:
        raise ConfigError(f"{folder}/vae has shift_factor={scale['shift_factor']}: latents "
                          "with a shift are not supported (SD v1/v2 have none)")
    size = unet_cfg.get("sample_size", 64)
    size = size[0] if isinstance(size, (list, tuple)) else size
    factor = 2 ** (len(vae_kwargs["ch_mult"]) - 1)
    config = sd_config(unet_kwargs, text_kwargs, "last", sched_cfg, size * factor)
    return SDModel(config, vae_config(vae_kwargs, scale["scaling_factor"]), unet, vae,
                   text_kwargs, text, tok, scale["scaling_factor"], os.path.abspath(folder))


# -- CompVis single files -------------------------------------------------------------------

def read_compvis(path: str, tokenizer: str | None, use_ema: bool = True,
                 parameterization: str | None = None) -> SDModel:
    from ldm_jax.convert import clip_weights, compvis_keys
    from ldm_jax.convert.diffusers_autoencoder import (autoencoder_kl_config_to_model_kwargs,
                                                       autoencoder_kl_state_dict_to_params)
    from ldm_jax.convert.diffusers_unet2d_condition import (
        unet2d_condition_config_to_model_kwargs, unet2d_condition_state_dict_to_params)
    from ldm_jax.data.clip_tokenizer import load_clip_tokenizer

    if not tokenizer:
        raise ConfigError(f"{path} is a single checkpoint file, which holds no tokenizer; pass "
                          "--tokenizer=DIR, a folder with CLIP's vocab.json and merges.txt (the "
                          "tokenizer/ folder of a diffusers Stable Diffusion model)")
    sd = read_weight_file(path)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):  # a Lightning .ckpt
        sd = sd["state_dict"]
    sd = {k: (v.detach().float().numpy() if hasattr(v, "detach") else v) for k, v in sd.items()}
    try:
        configs = compvis_keys.infer_sd_configs(sd)
        parts = compvis_keys.compvis_to_diffusers(sd, configs, use_ema=use_ema)
        unet_kwargs = unet2d_condition_config_to_model_kwargs(configs["unet"])
        vae_kwargs = autoencoder_kl_config_to_model_kwargs(configs["vae"])
        text_kwargs = clip_weights.clip_text_config_to_kwargs(configs["text_encoder"])
        unet = unet2d_condition_state_dict_to_params(parts["unet"], unet_kwargs)
        vae = autoencoder_kl_state_dict_to_params(parts["vae"], vae_kwargs)
        text = clip_weights.clip_text_state_dict_to_params(parts["text_encoder"], text_kwargs)
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: {str(e).strip(chr(39))}") from None
    open_clip = configs["text_kind"] == "open_clip"
    if parameterization is None:
        # SD 2's single files do not say which objective they were trained with.
        if open_clip:
            raise ConfigError(f"{path} is an SD 2 checkpoint, which does not record its "
                              "objective; pass --parameterization=v (the 768x768 models) or "
                              "--parameterization=eps (the 512x512 base models)")
        parameterization = "eps"
    prediction = {v: k for k, v in _PREDICTIONS.items()}[parameterization]
    scheduler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                 "num_train_timesteps": 1000, "prediction_type": prediction,
                 "steps_offset": 1, "set_alpha_to_one": False}
    tok = load_clip_tokenizer(tokenizer, text_kwargs["max_length"])
    size = 768 if open_clip and parameterization == "v" else 512
    # SD 2 reads OpenCLIP's penultimate layer; its file keeps all layers.
    output = "penultimate" if open_clip else "last"
    config = sd_config(unet_kwargs, text_kwargs, output, scheduler, size)
    scale = 0.18215
    return SDModel(config, vae_config(vae_kwargs, scale), unet, vae, text_kwargs, text, tok,
                   scale, os.path.abspath(path))


# -- configs --------------------------------------------------------------------------------

def _replace(config: ml_collections.ConfigDict, section: str, values: dict):
    """Set fields whose type may change (an int made a per-level tuple), which ConfigDict's
    typed assignment refuses."""
    d = config.to_dict()
    d[section].update(values)
    return ml_collections.ConfigDict(d)


def sd_config(unet_kwargs: dict, text_kwargs: dict, text_output: str, scheduler: dict,
              image_size: int) -> ml_collections.ConfigDict:
    """configs/sd_v1.py with the architecture, schedule and sampling conventions of the
    weights being read."""
    from configs import sd_v1
    wrong = {k: unet_kwargs.get(k) for k, v in _FIXED_UNET.items() if unet_kwargs.get(k) != v}
    if wrong:
        raise ConfigError(f"U-Net settings an ldm config cannot express: {wrong} (latent "
                          f"models use {_FIXED_UNET})")
    latent = unet_kwargs["out_channels"]
    extra = unet_kwargs["in_channels"] - latent
    if extra not in (0, latent + 1):
        raise ConfigError(f"a U-Net with {unet_kwargs['in_channels']} input channels for "
                          f"{latent} latent channels: only plain ({latent}) and inpainting "
                          f"({2 * latent + 1}) models are supported")
    config = sd_v1.get_config()
    config.conditioning.concat = "inpaint" if extra else "none"
    config.first_stage.latent_channels = latent
    te = config.text_encoder
    te.width, te.depth = text_kwargs["width"], text_kwargs["depth"]
    te.heads, te.max_length = text_kwargs["heads"], text_kwargs["max_length"]
    te.causal, te.output = text_kwargs["causal"], text_output
    if unet_kwargs["context_dim"] != te.width:
        raise ConfigError(f"the U-Net cross-attends to {unet_kwargs['context_dim']} channels but "
                          f"the text encoder gives {te.width}: the parts do not belong together")
    config.data.image_size = int(image_size)
    d = config.diffusion
    beta = scheduler.get("beta_schedule", "scaled_linear")
    if beta not in _BETAS:
        raise ConfigError(f"scheduler beta_schedule={beta!r} is not supported "
                          f"(one of {sorted(_BETAS)})")
    d.schedule = _BETAS[beta]
    d.beta_start = float(scheduler.get("beta_start", 0.00085))
    d.beta_end = float(scheduler.get("beta_end", 0.012))
    d.num_timesteps = int(scheduler.get("num_train_timesteps", 1000))
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in _PREDICTIONS:
        raise ConfigError(f"scheduler prediction_type={prediction!r} is not supported "
                          f"(one of {sorted(_PREDICTIONS)})")
    d.parameterization = _PREDICTIONS[prediction]
    s = config.sampling
    s.steps_offset = int(scheduler.get("steps_offset", 0))
    s.set_alpha_to_one = bool(scheduler.get("set_alpha_to_one", False))
    s.spacing = scheduler.get("timestep_spacing", "leading")
    model = {
        "base_channels": unet_kwargs["base_channels"],
        "channel_mult": tuple(unet_kwargs["channel_mult"]),
        "num_res_blocks": unet_kwargs["num_res_blocks"],
        "attention_levels": tuple(unet_kwargs["attention_levels"]),
        "num_heads": unet_kwargs["num_heads"], "head_dim": 0,
        "transformer_depth": unet_kwargs["transformer_depth"],
        "use_linear_projection": unet_kwargs["use_linear_projection"],
        "norm_groups": unet_kwargs["norm_groups"], "dropout": unet_kwargs["dropout"],
    }
    return _replace(config, "model", model)


def vae_config(vae_kwargs: dict, scale: float) -> ml_collections.ConfigDict:
    """configs/autoencoder_kl_f8_sd.py with the converted VAE's architecture."""
    from configs import autoencoder_kl_f8_sd
    config = autoencoder_kl_f8_sd.get_config()
    config.data.name = "tfds"  # training it again needs a dataset of your choice
    config.data.image_size = int(vae_kwargs["resolution"])
    config.latent.fixed_scale = float(scale)
    config.training.use_ema = False
    if vae_kwargs["in_channels"] != 3 or vae_kwargs["out_channels"] != 3:
        raise ConfigError("only RGB autoencoders (3 channels in and out) are supported")
    return _replace(config, "model", {
        "ch": vae_kwargs["ch"], "ch_mult": tuple(vae_kwargs["ch_mult"]),
        "num_res_blocks": vae_kwargs["num_res_blocks"],
        "attn_resolutions": tuple(vae_kwargs["attn_resolutions"]),
        "z_channels": vae_kwargs["z_channels"], "embed_dim": vae_kwargs["z_channels"],
        "norm_groups": vae_kwargs["norm_groups"]})
