"""The LDM / Stable Diffusion KL autoencoder (first stage), in Flax Linen.

NHWC images in [-1, 1] are encoded into a diagonal Gaussian over latents that are
f = 2 ** (len(ch_mult) - 1) times smaller per side; the decoder maps latents back to images.
Layout and names follow LDM's `Encoder`/`Decoder` (ch, ch_mult, num_res_blocks,
attn_resolutions, z_channels, resolution), so LDM configs read across directly.

As in LDM, attention placement is fixed by the configured `resolution`, not by the input:
a model configured for 256 x 256 keeps its attention levels when it runs on 512 x 512 images.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.initializers import init_from_one_draw
from ldm_jax.models.layers import Downsample, GroupNorm, SelfAttentionBlock, Upsample, _conv

Dtype = Any
NORM_EPS = 1e-6  # LDM's Normalize() and every diffusers VAE block


@flax.struct.dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), float32, shaped like the latents (NHWC)."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split the encoder output (mean channels first) and clamp logvar to [-30, 20] as LDM
        does, so exp(logvar) can neither underflow to a zero std nor overflow."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per example, summed over all non-batch dims: shape (B,)."""
        terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, self.mean.ndim)))


def downsampling_factor(ch_mult: Sequence[int]) -> int:
    return 2 ** (len(ch_mult) - 1)


def _field(config, name):
    return config[name] if isinstance(config, dict) else getattr(config, name)


def latent_shape(image_size, config) -> tuple[int, int, int]:
    """(H/f, W/f, z_channels) of the latents for `image_size` (an int or (H, W)).

    `config` is anything with `ch_mult` and `z_channels` (a model ConfigDict, a dict of
    AutoencoderKL kwargs, or the module). Raises a one-line ValueError for sizes not divisible by f.
    """
    ch_mult = tuple(_field(config, "ch_mult"))
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    check_image_size(h, w, ch_mult)
    f = downsampling_factor(ch_mult)
    return h // f, w // f, int(_field(config, "z_channels"))


def check_image_size(height: int, width: int, ch_mult: Sequence[int]):
    f = downsampling_factor(ch_mult)
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} is not divisible by {f}, the autoencoder's "
                         f"downsampling factor (2 ** (len(model.ch_mult) - 1) with model.ch_mult="
                         f"{tuple(ch_mult)}); use a size that is a multiple of {f} or change model.ch_mult")


def _attention_levels(resolution: int, ch_mult: Sequence[int], attn_resolutions) -> list[bool]:
    """Which levels carry attention, by LDM's rule: the level's nominal resolution is listed."""
    level_res = [resolution // 2 ** i for i in range(len(ch_mult))]
    missing = sorted(set(attn_resolutions) - set(level_res))
    if missing:
        raise ValueError(f"model.attn_resolutions {missing} match no level of a model with "
                         f"resolution {resolution} (its levels are {level_res}); fix "
                         "model.attn_resolutions or model.resolution")
    return [r in attn_resolutions for r in level_res]


class ResnetBlock(nn.Module):
    """GN-SiLU-conv, GN-SiLU-dropout-conv, residual; the U-Net's ResBlock without time embedding.

    The second conv is zero-initialised, so each block starts as the identity, as in layers.ResBlock.
    """
    out_channels: int
    dropout: float = 0.0
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda name: GroupNorm(self.norm_groups, NORM_EPS, dtype=self.dtype, name=name)
        h = _conv(self.out_channels, dtype=self.dtype, name="conv1")(nn.silu(norm("norm1")(x)))
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(norm("norm2")(h)))
        h = _conv(self.out_channels, dtype=self.dtype, name="conv2", zero_init=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, kernel=1, dtype=self.dtype, name="skip")(x)
        return x.astype(self.dtype) + h


class _Blocks(nn.Module):
    """Fields and block factories shared by the encoder and the decoder."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    z_channels: int = 4
    dropout: float = 0.0
    resolution: int = 256
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def _res(self, channels, name):
        return ResnetBlock(channels, self.dropout, self.norm_groups, self.dtype, name=name)

    def _attn(self, name):
        # One head over all channels: dot_product_attention's default scale is C ** -0.5.
        return SelfAttentionBlock(1, None, self.norm_groups, self.dtype, NORM_EPS, name=name)

    def _middle(self, h, train):
        h = self._res(h.shape[-1], "mid_res0")(h, train)
        h = self._attn("mid_attn")(h)
        return self._res(h.shape[-1], "mid_res1")(h, train)

    def _out(self, h, channels):
        h = nn.silu(GroupNorm(self.norm_groups, NORM_EPS, dtype=self.dtype, name="norm_out")(h))
        return _conv(channels, dtype=self.dtype, name="conv_out")(h)


class Encoder(_Blocks):
    """Images (B, H, W, in_channels) -> moments (B, H/f, W/f, 2 * z_channels) (or z_channels)."""
    in_channels: int = 3
    double_z: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_image_size(x.shape[1], x.shape[2], self.ch_mult)
        attn = _attention_levels(self.resolution, self.ch_mult, self.attn_resolutions)
        h = _conv(self.ch, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self._res(self.ch * mult, f"down{level}_res{i}")(h, train)
                if attn[level]:
                    h = self._attn(f"down{level}_attn{i}")(h)
            if level != len(self.ch_mult) - 1:
                # Bottom/right padding only, as LDM and diffusers' VAE do.
                h = Downsample(h.shape[-1], self.dtype, padding=0, name=f"down{level}_downsample")(h)
        h = self._middle(h, train)
        return self._out(h, 2 * self.z_channels if self.double_z else self.z_channels)


class Decoder(_Blocks):
    """Latents (B, h, w, z_channels) -> images (B, f*h, f*w, out_channels), in `dtype`."""
    out_channels: int = 3

    @nn.compact
    def __call__(self, z, train: bool = False):
        attn = _attention_levels(self.resolution, self.ch_mult, self.attn_resolutions)
        h = _conv(self.ch * self.ch_mult[-1], dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        h = self._middle(h, train)
        for level in reversed(range(len(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = self._res(self.ch * self.ch_mult[level], f"up{level}_res{i}")(h, train)
                if attn[level]:
                    h = self._attn(f"up{level}_attn{i}")(h)
            if level != 0:
                h = Upsample(h.shape[-1], self.dtype, name=f"up{level}_upsample")(h)
        return self._out(h, self.out_channels)


class AutoencoderKL(nn.Module):
    """Encoder + 1x1 quant_conv -> DiagonalGaussian; 1x1 post_quant_conv + Decoder -> images.

    Defaults are SD's kl-f8 autoencoder. `encode`/`decode` are also usable on their own:
    `model.apply(variables, x, method=model.encode)`. Dropout, when set, needs rngs={"dropout": k}
    and train=True.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    z_channels: int = 4
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    resolution: int = 256
    norm_groups: int = 32
    dtype: Dtype = jnp.float32

    def setup(self):
        shared = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), z_channels=self.z_channels,
                      dropout=self.dropout, resolution=self.resolution,
                      norm_groups=self.norm_groups, dtype=self.dtype)
        self.encoder = Encoder(**shared, in_channels=self.in_channels, double_z=True)
        self.decoder = Decoder(**shared, out_channels=self.out_channels)
        self.quant_conv = _conv(2 * self.z_channels, kernel=1, dtype=self.dtype)
        self.post_quant_conv = _conv(self.z_channels, kernel=1, dtype=self.dtype)

    def encode(self, x, train: bool = False) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x, train)))

    def decode(self, z, train: bool = False) -> jax.Array:
        """Latents (unscaled: divide diffusion latents by the scale factor first) -> float32 images."""
        h = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(h, train).astype(jnp.float32)

    def __call__(self, x, key: jax.Array | None = None, *, train: bool = False):
        """(reconstruction, posterior); decodes a posterior sample drawn with `key`, or its mode
        when `key` is None."""
        posterior = self.encode(x, train)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, train), posterior


def init_params(model: AutoencoderKL, rng: jax.Array) -> dict:
    """The model's params from one random draw; call under jax.jit so init compiles, not runs
    eagerly. Initialises on the smallest valid image: params do not depend on the image size."""
    f = downsampling_factor(model.ch_mult)
    x = jnp.zeros((1, f, f, model.in_channels), jnp.float32)
    return init_from_one_draw(lambda k: model.init({"params": k}, x), rng)["params"]
