"""Stable Diffusion single files in the CompVis layout (`.ckpt` / `.safetensors` with
`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, optional `model_ema.*`)
to and from diffusers-layout state dicts: UNet2DConditionModel, AutoencoderKL and transformers'
CLIPTextModel (`text_model.*`). diffusers' layout is the pivot: the diffusers_* modules take it on
to our Flax params.

Pure functions on dicts of numpy arrays. Each part's config expands into rules
`(diffusers_keys, compvis_key, how)`, so both directions and the key checks share one table;
`how` is "same", "conv1x1" (CompVis 1x1 conv kernel <-> diffusers Linear matrix) or "concat"
(OpenCLIP's fused q/k/v projection <-> three Linears).
"""
from __future__ import annotations

import re

import numpy as np

from ldm_jax.convert.compvis_unet_keys import describe_unet, infer_unet_config, unet_rules

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
EMA = "model_ema."
_GROUPS = (("unet", UNET), ("vae", VAE), ("text", TEXT))
CLIP_PREFIX, OPEN_CLIP_PREFIX = "transformer.text_model.", "model."  # inside cond_stage_model.
# LatentDiffusion's diffusion-schedule tensors (logvar and lvlb_weights only in some files)
# and LitEma's counters: not weights.
SCHEDULE_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights"))
EMA_COUNTERS = frozenset(("model_ema.decay", "model_ema.num_updates"))
# Text tensors that the converted text encoder does not hold: CLIP's position_ids buffer,
# OpenCLIP's contrastive head (unused by SD).
_TEXT_IGNORED = {"clip": ("transformer.text_model.embeddings.position_ids",),
                 "open_clip": ("model.text_projection", "model.logit_scale")}
_DIFFUSERS_IGNORED = ("text_model.embeddings.position_ids",  # saved by older transformers
                      "embeddings.position_ids")

# ---- VAE -----------------------------------------------------------------------------------

_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_VAE_ATTN = (("norm", "group_norm", "same"), ("q", "to_q", "conv1x1"), ("k", "to_k", "conv1x1"),
             ("v", "to_v", "conv1x1"), ("proj_out", "to_out.0", "conv1x1"))
_VAE_TOP = (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out"))


def _wb(d: str, c: str, how: str = "same"):
    return [((f"{d}.weight",), f"{c}.weight", how), ((f"{d}.bias",), f"{c}.bias", "same")]


def _vae_resnet(d: str, c: str, shortcut: bool):
    parts = _VAE_RESNET + ((("nin_shortcut", "conv_shortcut"),) if shortcut else ())
    return [r for cp, dp in parts for r in _wb(f"{d}.{dp}", f"{c}.{cp}")]


def vae_rules(cfg: dict) -> list:
    """Rules for a diffusers AutoencoderKL config of the SD layout (plain encoder/decoder
    blocks, attention only in the mid blocks); CompVis keys without `first_stage_model.`."""
    chans, lpb = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    n = len(chans)
    if (list(cfg["down_block_types"]) != ["DownEncoderBlock2D"] * n
            or list(cfg["up_block_types"]) != ["UpDecoderBlock2D"] * n):
        raise ValueError("only SD's AutoencoderKL layout converts (DownEncoderBlock2D / "
                         f"UpDecoderBlock2D at every level), got {cfg['down_block_types']}")
    rules = _wb("quant_conv", "quant_conv") + _wb("post_quant_conv", "post_quant_conv")
    for part in ("encoder", "decoder"):
        rules += [r for c, d in _VAE_TOP for r in _wb(f"{part}.{d}", f"{part}.{c}")]
        for k in (1, 2):
            rules += _vae_resnet(f"{part}.mid_block.resnets.{k - 1}", f"{part}.mid.block_{k}",
                                 False)
        rules += [r for c, d, how in _VAE_ATTN
                  for r in _wb(f"{part}.mid_block.attentions.0.{d}", f"{part}.mid.attn_1.{c}", how)]
    for lvl, ch in enumerate(chans):
        for j in range(lpb):
            ch_in = chans[max(lvl - 1, 0)] if j == 0 else ch
            rules += _vae_resnet(f"encoder.down_blocks.{lvl}.resnets.{j}",
                                 f"encoder.down.{lvl}.block.{j}", ch_in != ch)
        if lvl < n - 1:
            rules += _wb(f"encoder.down_blocks.{lvl}.downsamplers.0.conv",
                         f"encoder.down.{lvl}.downsample.conv")
    for i in range(n):  # diffusers' up_blocks[0] is CompVis' deepest decoder.up level
        lvl = n - 1 - i
        ch_in = chans[min(lvl + 1, n - 1)]
        for j in range(lpb + 1):
            rules += _vae_resnet(f"decoder.up_blocks.{i}.resnets.{j}",
                                 f"decoder.up.{lvl}.block.{j}", j == 0 and ch_in != chans[lvl])
        if lvl > 0:
            rules += _wb(f"decoder.up_blocks.{i}.upsamplers.0.conv",
                         f"decoder.up.{lvl}.upsample.conv")
    return rules


def infer_vae_config(sd: dict) -> dict:
    """A diffusers AutoencoderKL config from CompVis VAE tensors (prefix removed). Read from
    the weights: in/out channels, block_out_channels, layers_per_block, latent_channels.
    Guessed: scaling_factor 0.18215 (SD's; it lives in the LDM yaml), sample_size 512,
    norm_num_groups 32."""
    n = _count(sd, r"encoder\.down\.(\d+)\.")
    chans = [_shape(sd, f"encoder.down.{i}.block.0.conv1.weight", "VAE")[0] for i in range(n)]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": _shape(sd, "encoder.conv_in.weight", "VAE")[1],
        "out_channels": _shape(sd, "decoder.conv_out.weight", "VAE")[0],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": chans,
        "layers_per_block": _count(sd, r"encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": _shape(sd, "post_quant_conv.weight", "VAE")[0],
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }


# ---- text encoder --------------------------------------------------------------------------

_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2")
# transformers CLIP (inside text_model.) -> OpenCLIP (inside cond_stage_model.model.)
_OPEN_CLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                    ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def text_rules(cfg: dict, kind: str) -> list:
    """Rules for a CLIPTextConfig-style dict; CompVis keys without `cond_stage_model.`.
    "clip" (SD v1) stores transformers' own names; "open_clip" (SD v2) OpenCLIP's."""
    t = "text_model."
    if kind == "clip":
        names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
        names += [f"final_layer_norm.{p}" for p in ("weight", "bias")]
        names += [f"encoder.layers.{i}.{m}.{p}" for i in range(cfg["num_hidden_layers"])
                  for m in _CLIP_LAYER for p in ("weight", "bias")]
        return [((t + k,), CLIP_PREFIX + k, "same") for k in names]
    if kind != "open_clip":
        raise ValueError(f"unknown text encoder kind {kind!r} (expected 'clip' or 'open_clip')")
    m = OPEN_CLIP_PREFIX
    rules = [((t + "embeddings.token_embedding.weight",), m + "token_embedding.weight", "same"),
             ((t + "embeddings.position_embedding.weight",), m + "positional_embedding", "same")]
    rules += _wb(t + "final_layer_norm", m + "ln_final")
    for i in range(cfg["num_hidden_layers"]):
        d, c = f"{t}encoder.layers.{i}.", f"{m}transformer.resblocks.{i}."
        rules += [r for dn, cn in _OPEN_CLIP_LAYER for r in _wb(d + dn, c + cn)]
        for p in ("weight", "bias"):  # q, k, v stacked along the output axis
            rules.append((tuple(f"{d}self_attn.{x}_proj.{p}" for x in "qkv"),
                          f"{c}attn.in_proj_{p}", "concat"))
    return rules


def text_kind(text_sd: dict) -> str:
    if any(k.startswith(CLIP_PREFIX) for k in text_sd):
        return "clip"
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in text_sd):
        return "open_clip"
    raise ValueError("no text encoder in the file: expected cond_stage_model.transformer."
                     "text_model.* (SD v1, CLIP) or cond_stage_model.model.* (SD v2, OpenCLIP)")


def infer_text_config(sd: dict, kind: str) -> dict:
    """CLIPTextConfig keyword arguments from CompVis text tensors (prefix removed). Read from
    the weights: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
    max_position_embeddings (and projection_dim for OpenCLIP). Guessed: num_attention_heads =
    hidden_size // 64 (true of CLIP ViT-L/14 and OpenCLIP ViT-H); hidden_act from the kind
    (quick_gelu for CLIP, gelu for OpenCLIP); layer_norm_eps 1e-5. All OpenCLIP layers are
    kept: SD v2 reads the penultimate layer (configs' "text_output"), where diffusers' SD v2
    text encoder instead drops the last layer."""
    if kind == "clip":
        p = CLIP_PREFIX + "embeddings."
        tok, pos = p + "token_embedding.weight", p + "position_embedding.weight"
        layers = r"transformer\.text_model\.encoder\.layers\.(\d+)\."
        fc1 = CLIP_PREFIX + "encoder.layers.0.mlp.fc1.weight"
    else:
        p = OPEN_CLIP_PREFIX
        tok, pos = p + "token_embedding.weight", p + "positional_embedding"
        layers = r"model\.transformer\.resblocks\.(\d+)\."
        fc1 = p + "transformer.resblocks.0.mlp.c_fc.weight"
    vocab, width = _shape(sd, tok, "text encoder")
    cfg = {
        "vocab_size": vocab, "hidden_size": width,
        "intermediate_size": _shape(sd, fc1, "text encoder")[0],
        "num_hidden_layers": _count(sd, layers),
        "num_attention_heads": max(width // 64, 1),
        "max_position_embeddings": _shape(sd, pos, "text encoder")[0],
        "hidden_act": "quick_gelu" if kind == "clip" else "gelu",
        "layer_norm_eps": 1e-5,
    }
    if kind == "open_clip" and "model.text_projection" in sd:
        cfg["projection_dim"] = _shape(sd, "model.text_projection", "text encoder")[1]
    return cfg


# ---- whole files ---------------------------------------------------------------------------

def split_compvis(state_dict: dict, use_ema: bool = True) -> dict:
    """Group a CompVis file's tensors: {"unet", "vae", "text"} (each without its prefix),
    "ignored" (schedule buffers, EMA counters, the unused U-Net copy), "unknown" (anything
    else) and "used_ema". With use_ema and EMA weights in the file, the U-Net comes from
    `model_ema.<"diffusion_model" + the key's rest without dots>` (LitEma's naming)."""
    sd = state_dict.get("state_dict", state_dict)  # a .ckpt wraps it with global_step etc.
    if not isinstance(sd, dict) or not any(k.startswith(UNET) for k in sd):
        raise ValueError("not a Stable Diffusion checkpoint: no model.diffusion_model.* tensors")
    out = {"unet": {}, "vae": {}, "text": {}, "ignored": {}, "unknown": {}}
    ema = {}
    for k, v in sd.items():
        group = next(((g, p) for g, p in _GROUPS if k.startswith(p)), None)
        if group:
            out[group[0]][k[len(group[1]):]] = v
        elif k in SCHEDULE_BUFFERS or k in EMA_COUNTERS:
            out["ignored"][k] = v
        elif k.startswith(EMA):
            ema[k] = v
        else:
            out["unknown"][k] = v
    out["used_ema"] = bool(use_ema and ema)
    if not out["used_ema"]:
        out["ignored"].update(ema)
        return out
    flat = {k: EMA + "diffusion_model" + k.replace(".", "") for k in out["unet"]}
    lacking = [UNET + k for k, e in flat.items() if e not in ema]
    if lacking:
        raise ValueError(f"the file's EMA weights lack {len(lacking)} U-Net tensors, e.g. "
                         f"{', '.join(lacking[:3])}; pass use_ema=False for the non-EMA weights")
    out["ignored"].update({UNET + k: v for k, v in out["unet"].items()})
    out["unet"] = {k: ema.pop(e) for k, e in flat.items()}
    out["unknown"].update(ema)  # EMA tensors with no U-Net counterpart
    return out


def infer_sd_configs(state_dict: dict, attention_head_dim=None) -> dict:
    """Configs from key names and shapes: {"unet": UNet2DConditionModel config, "vae":
    AutoencoderKL config, "text_encoder": CLIPTextConfig kwargs, "text_kind": "clip" |
    "open_clip", "text_output": "last" | "penultimate"}. What is guessed rather than read is
    listed in infer_unet_config, infer_vae_config and infer_text_config; `attention_head_dim`
    overrides the U-Net's guessed head counts."""
    parts = split_compvis(state_dict, use_ema=False)
    kind = text_kind(parts["text"])
    return {"unet": infer_unet_config(parts["unet"], attention_head_dim),
            "vae": infer_vae_config(parts["vae"]),
            "text_encoder": infer_text_config(parts["text"], kind),
            "text_kind": kind,
            "text_output": "last" if kind == "clip" else "penultimate"}


def _part_rules(configs: dict):
    """(name, CompVis prefix, rules, assumed architecture, ignorable CompVis keys) per part."""
    u, v, t, kind = configs["unet"], configs["vae"], configs["text_encoder"], configs["text_kind"]
    return (("unet", UNET, unet_rules(u), describe_unet(u), ()),
            ("vae", VAE, vae_rules(v), f"SD AutoencoderKL with block_out_channels "
             f"{list(v['block_out_channels'])}, layers_per_block {v['layers_per_block']}", ()),
            ("text_encoder", TEXT, text_rules(t, kind), f"{kind} text encoder with "
             f"{t['num_hidden_layers']} layers", _TEXT_IGNORED.get(kind, ())))


def compvis_to_diffusers(state_dict: dict, configs: dict | None = None,
                         use_ema: bool = True) -> dict:
    """{"unet", "vae", "text_encoder"}: diffusers/transformers state dicts from a CompVis file,
    the text keys as published SD folders have them (`text_model.*`).
    `configs` defaults to infer_sd_configs(state_dict). ValueError names missing or unexpected
    keys and the architecture that was assumed."""
    parts = split_compvis(state_dict, use_ema)
    if parts["unknown"]:
        raise ValueError(f"{len(parts['unknown'])} tensors belong to no SD part, e.g. "
                         f"{', '.join(sorted(parts['unknown'])[:3])}")
    configs = configs or infer_sd_configs(state_dict)
    src = {"unet": parts["unet"], "vae": parts["vae"], "text_encoder": parts["text"]}
    out = {}
    for name, prefix, rules, arch, ignored in _part_rules(configs):
        have = {k: a for k, a in src[name].items() if k not in ignored}
        _check(have, {c for _, c, _ in rules}, f"{prefix}*", prefix, arch)
        out[name] = {d: a for dks, c, how in rules
                     for d, a in zip(dks, _unpack(have[c], how, len(dks)))}
    return out


def diffusers_to_compvis(unet_sd: dict, vae_sd: dict, text_sd: dict, configs: dict,
                         extras: dict | None = None) -> dict:
    """The CompVis single-file state dict of diffusers/transformers state dicts (the inverse of
    compvis_to_diffusers); text keys with or without `text_model.`. `extras` (e.g. schedule
    buffers, OpenCLIP's text_projection) are copied in unchanged; nothing else is invented."""
    src = {"unet": unet_sd, "vae": vae_sd, "text_encoder": text_sd}
    out = {}
    for name, prefix, rules, arch, _ in _part_rules(configs):
        have = {k: a for k, a in src[name].items() if k not in _DIFFUSERS_IGNORED}
        if name == "text_encoder":  # transformers 5's CLIPTextModel drops the text_model. level
            have = {k if k.startswith("text_model.") else "text_model." + k: a
                    for k, a in have.items()}
        want = {d for dks, _, _ in rules for d in dks}
        _check(have, want, f"the diffusers {name} state dict", "", arch)
        for dks, c, how in rules:
            out[prefix + c] = _pack([have[d] for d in dks], how)
    out.update(extras or {})
    return out


def _unpack(a, how: str, n: int) -> list:
    if how == "conv1x1":
        if a.ndim == 4 and a.shape[2:] != (1, 1):
            raise ValueError(f"expected a 1x1 conv kernel, got shape {tuple(a.shape)}")
        return [np.reshape(a, a.shape[:2])]
    if how == "concat":
        return np.split(np.asarray(a), n, axis=0)
    return [a]


def _pack(arrays: list, how: str):
    if how == "conv1x1":
        return np.reshape(arrays[0], (*arrays[0].shape, 1, 1))
    if how == "concat":
        return np.concatenate([np.asarray(a) for a in arrays], axis=0)
    return arrays[0]


def _check(have: dict, want: set, label: str, prefix: str, arch: str) -> None:
    missing, extra = sorted(want - set(have)), sorted(set(have) - want)
    if missing or extra:
        say = [f"{len(ks)} {what} keys, e.g. {', '.join(prefix + k for k in ks[:3])}"
               for what, ks in (("missing", missing), ("unexpected", extra)) if ks]
        raise ValueError(f"{label} does not match the assumed {arch}: {'; '.join(say)}")


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def _shape(sd: dict, key: str, part: str) -> tuple:
    if key not in sd:
        raise ValueError(f"{part} tensor {key} is missing; not a Stable Diffusion checkpoint")
    return tuple(int(x) for x in sd[key].shape)
