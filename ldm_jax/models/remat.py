"""Rematerialisation (activation recomputation) policies of the U-Net, per block type.

The text form (config `model.remat`):
  "none" | "full" | "save_dots"              the same policy for every block type, or
  "res=full,transformer=save_dots"           per type; types left out get "none".
Block types: `res` (ResBlock) and `transformer` (SpatialTransformer, SelfAttentionBlock).
  none       keep every activation (fastest, most memory)
  full       keep only the block's inputs; recompute the rest in the backward pass
  save_dots  keep the results of matmuls without batch dimensions (the projections), recompute
             the cheap elementwise work and the attention scores
Old configs stored a bool: True meant recomputing the residual blocks ("res=full").
"""
from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = ("none", "full", "save_dots")
BLOCK_TYPES = ("res", "transformer")
GRAMMAR = ("'none' | 'full' | 'save_dots', or per block type as "
           "'res=<policy>,transformer=<policy>'")


def from_legacy(value):
    """A stored bool (before policies existed) as its policy text; anything else unchanged."""
    if isinstance(value, bool):
        return "res=full" if value else "none"
    return value


def parse(spec) -> dict[str, str]:
    """{block type: policy} for every block type. ValueError naming the allowed values."""
    spec = from_legacy(spec)
    if not isinstance(spec, str):
        raise ValueError(f"model.remat={spec!r} must be a string: {GRAMMAR}")
    text = spec.replace(" ", "")
    if text in POLICIES:
        return dict.fromkeys(BLOCK_TYPES, text)
    out = dict.fromkeys(BLOCK_TYPES, "none")
    for item in text.split(","):
        kind, _, policy = item.partition("=")
        if kind not in BLOCK_TYPES or policy not in POLICIES:
            raise ValueError(f"model.remat={spec!r}: cannot read {item!r}; use {GRAMMAR} "
                             f"(block types {list(BLOCK_TYPES)})")
        out[kind] = policy
    return out


def wrap(module_cls, policy: str, static_argnums=()):
    """`module_cls`, recomputed in the backward pass as `policy` says ("none": unchanged).
    static_argnums count `self` as 0, as flax's nn.remat does."""
    if policy == "none":
        return module_cls
    saveable = {"full": None,
                "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[policy]
    return nn.remat(module_cls, policy=saveable, static_argnums=static_argnums)
