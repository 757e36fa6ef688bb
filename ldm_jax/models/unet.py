"""The DDPM/ADM-style U-Net (Ho et al. 2020; Dhariwal & Nichol 2021), in Flax Linen.

Input NHWC images and integer (or fractional) timesteps; output has the input's channels
(or `out_channels`). With `label_sizes`, integer labels (one column per label) are embedded
and added to the time embedding, as ADM does for classes. Conditioning on text
(cross-attention) is added by later stages through the `context` argument, reserved here.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.initializers import lecun_normal
from ldm_jax.models.label_embedding import LabelEmbedding
from ldm_jax.models.layers import (Downsample, GroupNorm, ResBlock, SelfAttentionBlock,
                                   Upsample, _conv, timestep_embedding)


class UNet(nn.Module):
    base_channels: int = 128
    channel_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: Sequence[int] = (16,)
    num_heads: int = 1
    head_dim: int | None = None
    dropout: float = 0.0
    norm_groups: int = 32
    # DDPM reference values (TF group_norm epsilon; 'SAME' stride-2 padding); ADM/SD use 1e-5 and 1.
    norm_eps: float = 1e-6
    downsample_padding: int = 0
    out_channels: int | None = None
    remat: bool = False  # recompute residual blocks in the backward pass to save memory
    label_sizes: Sequence[int] = ()  # values per conditioning label; () = unconditional
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, t, *, labels=None, context=None, train: bool = False):
        if context is not None:
            raise NotImplementedError("this U-Net has no cross-attention; use a conditional U-Net")
        if (labels is None) != (not self.label_sizes):
            raise ValueError("labels must be given exactly when the U-Net has label_sizes "
                             f"(label_sizes={tuple(self.label_sizes)}, labels given: {labels is not None})")
        check_input_size(x.shape[1], self.channel_mult, self.attention_resolutions)
        out_ch = self.out_channels or x.shape[-1]
        res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
        block = lambda ch, name: res_cls(ch, self.dropout, self.norm_groups, self.dtype,
                                         self.norm_eps, name=name)
        attn = lambda name: SelfAttentionBlock(self.num_heads, self.head_dim, self.norm_groups,
                                               self.dtype, self.norm_eps, name=name)

        temb_dim = 4 * self.base_channels
        temb = timestep_embedding(t, self.base_channels)
        temb = nn.Dense(temb_dim, dtype=self.dtype, kernel_init=lecun_normal, name="time_dense1")(temb)
        temb = nn.Dense(temb_dim, dtype=self.dtype, kernel_init=lecun_normal, name="time_dense2")(nn.silu(temb))
        if self.label_sizes:
            temb = temb + LabelEmbedding(tuple(self.label_sizes), temb_dim, self.dtype,
                                         name="label_embedding")(labels)

        h = _conv(self.base_channels, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        skips = [h]
        resolution = x.shape[1]
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = block(self.base_channels * mult, f"down{level}_res{i}")(h, temb, train)
                if resolution in self.attention_resolutions:
                    h = attn(f"down{level}_attn{i}")(h)
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                h = Downsample(h.shape[-1], self.dtype, self.downsample_padding,
                               name=f"down{level}_downsample")(h)
                skips.append(h)
                resolution //= 2

        h = block(h.shape[-1], "mid_res0")(h, temb, train)
        h = attn("mid_attn")(h)
        h = block(h.shape[-1], "mid_res1")(h, temb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = block(self.base_channels * mult, f"up{level}_res{i}")(h, temb, train)
                if resolution in self.attention_resolutions:
                    h = attn(f"up{level}_attn{i}")(h)
            if level != 0:
                h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_upsample")(h)
                resolution *= 2

        h = nn.silu(GroupNorm(self.norm_groups, self.norm_eps, dtype=self.dtype, name="norm_out")(h))
        h = _conv(out_ch, dtype=self.dtype, name="conv_out", zero_init=True)(h)
        return h.astype(jnp.float32)


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
