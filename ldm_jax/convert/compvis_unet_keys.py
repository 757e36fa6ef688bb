"""The Stable Diffusion U-Net's CompVis key names (`model.diffusion_model.*`, LDM's
openaimodel.py) against diffusers' `UNet2DConditionModel`, and its config read from shapes.

A U-Net config expands into rules `(diffusers_keys, compvis_key, how)`, one per tensor, so both
directions and the missing/unexpected checks come from the same table. The transformer blocks
carry the same names on both sides; only the module paths and the ResBlock parts differ.
"""
from __future__ import annotations

import re

# CompVis ResBlock (Sequential indices) -> diffusers ResnetBlock2D.
_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_SHORTCUT = ("skip_connection", "conv_shortcut")
# BasicTransformerBlock modules with weight and bias; q/k/v projections have no bias.
_BLOCK_WB = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj",
             "ff.net.2")
_BLOCK_W = tuple(f"attn{i}.to_{p}" for i in (1, 2) for p in "qkv")
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"


def _wb(d: str, c: str):
    return [((f"{d}.{p}",), f"{c}.{p}", "same") for p in ("weight", "bias")]


def _resnet(d: str, c: str, shortcut: bool):
    parts = _RESNET + ((_SHORTCUT,) if shortcut else ())
    return [r for cp, dp in parts for r in _wb(f"{d}.{dp}", f"{c}.{cp}")]


def _transformer(d: str, c: str, depth: int):
    rules = [r for m in ("norm", "proj_in", "proj_out") for r in _wb(f"{d}.{m}", f"{c}.{m}")]
    for b in range(depth):
        blk = f"transformer_blocks.{b}"
        rules += [r for m in _BLOCK_WB for r in _wb(f"{d}.{blk}.{m}", f"{c}.{blk}.{m}")]
        rules += [((f"{d}.{blk}.{m}.weight",), f"{c}.{blk}.{m}.weight", "same") for m in _BLOCK_W]
    return rules


def _levels(cfg: dict, key: str, n: int) -> list:
    v = cfg.get(key, 1)
    return list(v) if isinstance(v, (list, tuple)) else [v] * n


def unet_rules(cfg: dict) -> list:
    """Rules for a diffusers UNet2DConditionModel config of the SD layout (cross-attention or
    plain down/up blocks, a cross-attention mid block, no class embedding); CompVis keys are
    given without the `model.diffusion_model.` prefix."""
    chans = list(cfg["block_out_channels"])
    n, lpb = len(chans), cfg["layers_per_block"]
    down, up = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    bad = sorted(set(down) - {_CROSS_DOWN, _PLAIN_DOWN}) + sorted(set(up) - {_CROSS_UP, _PLAIN_UP})
    if bad or len(down) != n or len(up) != n:
        raise ValueError(f"U-Net block types {down} / {up} are not of the SD layout "
                         f"({_CROSS_DOWN}/{_PLAIN_DOWN}, {_CROSS_UP}/{_PLAIN_UP}, one per level)")
    depth = _levels(cfg, "transformer_layers_per_block", n)
    rules = (_wb("time_embedding.linear_1", "time_embed.0") + _wb("time_embedding.linear_2",
             "time_embed.2") + _wb("conv_in", "input_blocks.0.0") + _wb("conv_norm_out", "out.0")
             + _wb("conv_out", "out.2"))
    idx = 1
    for lvl, ch in enumerate(chans):
        for j in range(lpb):
            ch_in = chans[max(lvl - 1, 0)] if j == 0 else ch
            rules += _resnet(f"down_blocks.{lvl}.resnets.{j}", f"input_blocks.{idx}.0", ch_in != ch)
            if down[lvl] == _CROSS_DOWN:
                rules += _transformer(f"down_blocks.{lvl}.attentions.{j}", f"input_blocks.{idx}.1",
                                      depth[lvl])
            idx += 1
        if lvl < n - 1:
            rules += _wb(f"down_blocks.{lvl}.downsamplers.0.conv", f"input_blocks.{idx}.0.op")
            idx += 1
    rules += (_resnet("mid_block.resnets.0", "middle_block.0", False)
              + _transformer("mid_block.attentions.0", "middle_block.1", depth[-1])
              + _resnet("mid_block.resnets.1", "middle_block.2", False))
    idx = 0
    for i in range(n):  # up_blocks[0] is the deepest level
        lvl = n - 1 - i
        for j in range(lpb + 1):
            # Skip connections are concatenated, so every up ResBlock changes its width.
            rules += _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", True)
            sub = 1
            if up[i] == _CROSS_UP:
                rules += _transformer(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1",
                                      depth[lvl])
                sub = 2
            if j == lpb and i < n - 1:
                rules += _wb(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{idx}.{sub}.conv")
            idx += 1
    return rules


def _shape(sd: dict, key: str) -> tuple:
    if key not in sd:
        raise ValueError(f"U-Net tensor {key} is missing; not a CompVis Stable Diffusion U-Net")
    return tuple(int(x) for x in sd[key].shape)


def _count(keys, pattern: str) -> int:
    found = {m.group(1) for k in keys for m in [re.match(pattern, k)] if m}
    return len(found)


def infer_unet_config(sd: dict, attention_head_dim=None) -> dict:
    """A diffusers UNet2DConditionModel config from CompVis U-Net tensors (prefix removed).

    Read from the weights: in/out channels, block_out_channels, layers_per_block, which levels
    have attention (down and up), transformer depth, cross_attention_dim, use_linear_projection.
    Guessed (not in the weights): the heads, `attention_head_dim` (diffusers' name for the head
    count): 8 when the context is 768-wide (SD v1), else 64-channel heads per level (SD v2;
    one head where a width is not a multiple of 64) unless `attention_head_dim` is given;
    sample_size 64; everything else takes diffusers' defaults (norm_num_groups 32, ...)."""
    keys = list(sd)
    n = _count(keys, r"input_blocks\.(\d+)\.0\.op\.weight$") + 1
    blocks = _count(keys, r"input_blocks\.(\d+)\.")
    if blocks % n:
        raise ValueError(f"{blocks} input blocks do not split into {n} levels; "
                         "not a CompVis Stable Diffusion U-Net")
    lpb = blocks // n - 1
    first = [1 + lvl * (lpb + 1) for lvl in range(n)]  # each level's first input block
    chans = [_shape(sd, f"input_blocks.{i}.0.out_layers.3.weight")[0] for i in first]
    down_attn = [f"input_blocks.{i}.1.proj_in.weight" in sd for i in first]
    up_attn = [f"output_blocks.{i * (lpb + 1)}.1.proj_in.weight" in sd for i in range(n)]
    if "middle_block.1.proj_in.weight" not in sd:
        raise ValueError("the U-Net's middle block has no transformer (middle_block.1); only "
                         "Stable Diffusion's cross-attention U-Net converts")
    mid_depth = _count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    depth = [_count(keys, rf"input_blocks\.{i}\.1\.transformer_blocks\.(\d+)\.") if a
             else mid_depth for i, a in zip(first, down_attn)]
    context = _shape(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    if attention_head_dim is None:
        attention_head_dim = 8 if context == 768 else [c // 64 if c % 64 == 0 else 1
                                                       for c in chans]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64,
        "in_channels": _shape(sd, "input_blocks.0.0.weight")[1],
        "out_channels": _shape(sd, "out.2.weight")[0],
        "block_out_channels": chans,
        "layers_per_block": lpb,
        "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in down_attn],
        "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in up_attn],
        "cross_attention_dim": context,
        "attention_head_dim": attention_head_dim,
        "use_linear_projection": len(_shape(sd, "middle_block.1.proj_in.weight")) == 2,
        "transformer_layers_per_block": depth[0] if len(set(depth)) == 1 else depth,
    }


def describe_unet(cfg: dict) -> str:
    """The assumed architecture in a few words, for error messages."""
    attn = [i for i, t in enumerate(cfg["down_block_types"]) if t == _CROSS_DOWN]
    return (f"SD U-Net with block_out_channels {list(cfg['block_out_channels'])}, "
            f"layers_per_block {cfg['layers_per_block']}, attention at levels {attn}, "
            f"transformer depth {cfg.get('transformer_layers_per_block', 1)}")
