"""The DDPM/ADM-style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021), in Flax Linen.

Input NHWC images and integer (or fractional) timesteps; output has the input's channels
(or `out_channels`). With `label_sizes`, integer labels (one column per label) are embedded
and added to the time embedding, as ADM does for classes; with `vector_dim`, a vector
(B, vector_dim) is embedded and added likewise.

With `context_dim`, the same U-Net is the latent-diffusion / Stable Diffusion v1 U-Net: every
attention block becomes a `SpatialTransformer` that cross-attends to `context` (B, L,
context_dim), e.g. text embeddings, with an optional key padding mask `context_mask` (B, L).
Concat conditioning (masked image, low-res image) is `in_channels` > `out_channels`.
The defaults build exactly the DDPM U-Net and its parameter tree.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import remat
from ldm_jax.models.initializers import lecun_normal
from ldm_jax.models.label_embedding import LabelEmbedding, VectorEmbedding
from ldm_jax.models.layers import (Downsample, GroupNorm, ResBlock, SelfAttentionBlock,
                                   Upsample, _conv, timestep_embedding)
from ldm_jax.models.transformer import SpatialTransformer

PerLevel = int | Sequence[int]


class UNet(nn.Module):
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    # Level indices (0 = full resolution) with attention; when set, replaces attention_resolutions
    # so one model runs at any input size (SD is used at several).
    attention_levels: Sequence[int] | None = None
    num_heads: PerLevel = 1  # an int for all levels, or one per level (the middle uses the last)
    head_dim: PerLevel | None = None  # when set, heads = channels // head_dim (int or per level)
    dropout: float = 0.0
    norm_groups: int = 32
    # DDPM reference values (TF group_norm epsilon; 'SAME' stride-2 padding); ADM/SD use 1e-5 and 1.
    norm_eps: float = 1e-6
    downsample_padding: int = 0
    in_channels: int | None = None  # checked against the input when set
    out_channels: int | None = None
    # Timestep embedding conventions: DDPM's (shift 1, sines first) or SD's (0, True).
    freq_shift: float = 1.0
    flip_sin_to_cos: bool = False
    # Cross-attention (latent diffusion): None keeps the plain self-attention blocks.
    context_dim: int | None = None
    transformer_depth: PerLevel = 1
    use_linear_projection: bool = False
    # Recomputation in the backward pass, per block type (models/remat.py): "none", "full",
    # "save_dots", or e.g. "res=full,transformer=save_dots"; a bool is an old config's value.
    remat: str | bool = "none"
    attention: str = "auto"  # attention kernel: auto | xla | cudnn | chunked (attention_impl)
    label_sizes: Sequence[int] = ()  # values per conditioning label; () = unconditional
    vector_dim: int | None = None  # width of a conditioning vector added to the time embedding
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, *, labels=None, context=None, context_mask=None, vector=None,
                 train: bool = False):
        self._check_context(context, context_mask, x.shape[0])
        if self.in_channels is not None and x.shape[-1] != self.in_channels:
            raise ValueError(f"the U-Net takes {self.in_channels} input channels, got "
                             f"{x.shape[-1]}; check model.in_channels (concat conditioning "
                             "adds channels)")
        if (labels is None) != (not self.label_sizes):
            raise ValueError("labels must be given exactly when the U-Net has label_sizes "
                             f"(label_sizes={tuple(self.label_sizes)}, labels given: {labels is not None})")
        if (vector is None) != (self.vector_dim is None):
            raise ValueError("vector must be given exactly when the U-Net has vector_dim "
                             f"(vector_dim={self.vector_dim}, vector given: {vector is not None})")
        if vector is not None and vector.shape != (x.shape[0], self.vector_dim):
            raise ValueError(f"vector must have shape ({x.shape[0]}, {self.vector_dim}), "
                             f"got {vector.shape}")
        levels = len(self.channel_mult)
        if (self.attention_levels is not None
                and not set(self.attention_levels) <= set(range(levels))):
            raise ValueError(f"model.attention_levels {tuple(self.attention_levels)} must be level "
                             f"indices below {levels} (the length of model.channel_mult)")
        check_input_size(x.shape[1], self.channel_mult,
                         self.attention_resolutions if self.attention_levels is None else ())
        out_ch = self.out_channels or x.shape[-1]
        policy = remat.parse(self.remat)
        res_cls = remat.wrap(ResBlock, policy["res"], static_argnums=(3,))  # (self, x, temb, train)
        self_attn_cls = remat.wrap(SelfAttentionBlock, policy["transformer"])
        transformer_cls = remat.wrap(SpatialTransformer, policy["transformer"])
        block = lambda ch, name: res_cls(ch, self.dropout, self.norm_groups, self.dtype,
                                         self.norm_eps, name=name)
        heads, head_dim = per_level(self.num_heads, levels), per_level(self.head_dim, levels)
        depth = per_level(self.transformer_depth, levels)

        def attn(level, name, h):
            if self.context_dim is None:
                return self_attn_cls(heads[level], head_dim[level], self.norm_groups,
                                     self.dtype, self.norm_eps, self.attention, name=name)(h)
            ch = h.shape[-1]
            n = ch // head_dim[level] if head_dim[level] else heads[level]
            if ch % n:
                raise ValueError(f"attention: {ch} channels cannot be split into {n} heads")
            return transformer_cls(n, ch // n, depth[level], self.norm_groups,
                                   self.use_linear_projection, self.dtype, self.attention,
                                   name=name)(h, context, context_mask)

        def has_attn(level, resolution):
            if self.attention_levels is not None:
                return level in self.attention_levels
            return resolution in self.attention_resolutions

        temb_dim = 4 * self.base_channels
        temb = timestep_embedding(t, self.base_channels, freq_shift=self.freq_shift,
                                  flip_sin_to_cos=self.flip_sin_to_cos)
        temb = nn.Dense(temb_dim, dtype=self.dtype, kernel_init=lecun_normal, name="time_dense1")(temb)
        temb = nn.Dense(temb_dim, dtype=self.dtype, kernel_init=lecun_normal, name="time_dense2")(nn.silu(temb))
        if self.label_sizes:
            temb = temb + LabelEmbedding(tuple(self.label_sizes), temb_dim, self.dtype,
                                         name="label_embedding")(labels)
        if self.vector_dim is not None:
            temb = temb + VectorEmbedding(temb_dim, self.dtype, name="vector_embedding")(vector)

        h = _conv(self.base_channels, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = [h]
        resolution = x.shape[1]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = block(self.base_channels * mult, f"down{level}_res{i}")(h, temb, train)
                if has_attn(level, resolution):
                    h = attn(level, f"down{level}_attn{i}", h)
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                h = Downsample(h.shape[-1], self.dtype, self.downsample_padding,
                               name=f"down{level}_downsample")(h)
                skips.append(h)
                resolution //= 2

        h = block(h.shape[-1], "mid_res0")(h, temb, train)
        h = attn(levels - 1, "mid_attn", h)
        h = block(h.shape[-1], "mid_res1")(h, temb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(self.base_channels * mult, f"up{level}_res{i}")(h, temb, train)
                if has_attn(level, resolution):
                    h = attn(level, f"up{level}_attn{i}", h)
            if level != 0:
                h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_upsample")(h)
                resolution *= 2

        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        h = _conv(out_ch, dtype=self.dtype, name="conv_out", zero_init=True)(h)
        return h.astype(jnp.float32)

    def _check_context(self, context, context_mask, batch):
        if self.context_dim is None:
            if context is not None or context_mask is not None:
                raise ValueError("this U-Net has no cross-attention (model.context_dim is None); "
                                 "do not pass context")
            return
        if context is None:
            raise ValueError(f"this U-Net cross-attends: pass context of shape (batch, length, "
                             f"{self.context_dim})")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape ({batch}, length, {self.context_dim}), "
                             f"got {context.shape}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(f"context_mask must have shape {context.shape[:2]}, "
                             f"got {context_mask.shape}")


def per_level(value, levels: int) -> tuple:
    """An int (or None) for every level, or a per-level sequence checked for length."""
    if value is None or isinstance(value, int):
        return (value,) * levels
    value = tuple(value)
    if len(value) != levels:
        raise ValueError(f"per-level setting {value} has {len(value)} entries for {levels} levels")
    return value


def check_input_size(size: int, channel_mult: Sequence[int], attention_resolutions: Sequence[int]):
    """Raise a ValueError a person can act on when the U-Net cannot take `size`x`size` inputs."""
    factor = 2 ** (len(channel_mult) - 1)
    if size % factor:
        raise ValueError(f"image size {size} is not divisible by {factor} (the U-Net downsamples "
                         f"{len(channel_mult) - 1} times); use a size that is a multiple of {factor} "
                         "or change model.channel_mult")
    reachable = {size // 2 ** i for i in range(len(channel_mult))}
    missing = sorted(set(attention_resolutions) - reachable)
    if missing:
        raise ValueError(f"model.attention_resolutions {missing} never occur for {size}x{size} inputs "
                         f"(resolutions are {sorted(reachable, reverse=True)}); adjust one or the other")


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
