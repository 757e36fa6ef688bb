"""Inputs concatenated to the latents as extra U-Net channels (latent diffusion's concat
conditioning): a mask with the masked image's latents for inpainting, a low-resolution image
for 4x super-resolution. Pure array functions, shared by training and sampling, so both build
exactly the same inputs.

Masks are (B, H, W, 1) floats, 1 where the image is to be generated (SD's convention).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

LOWRES_FACTOR = 4  # super-resolution: the low-resolution image is 4x smaller per side
CONCAT_KINDS = ("none", "inpaint", "lowres")


def extra_channels(kind: str, latent_channels: int, factor: int) -> int:
    """U-Net input channels added by concat conditioning `kind` with an f=`factor` first stage."""
    if kind == "inpaint":
        return 1 + latent_channels
    if kind == "lowres":
        return 3 * (factor // LOWRES_FACTOR) ** 2
    return 0


def random_masks(key, batch: int, size: int, full_prob: float):
    """One random axis-aligned box per image (sides uniform in [size/4, size]), or, with
    probability `full_prob`, the whole image (so the model also learns plain generation)."""
    k_box, k_full = jax.random.split(key)
    lo, hi = max(size // 4, 1), size + 1
    sides = jax.random.randint(jax.random.fold_in(k_box, 0), (batch, 2), lo, hi)
    corner = jax.random.uniform(jax.random.fold_in(k_box, 1), (batch, 2))
    start = jnp.floor(corner * (size - sides + 1)).astype(jnp.int32)
    idx = jnp.arange(size)
    rows = (idx[None] >= start[:, :1]) & (idx[None] < start[:, :1] + sides[:, :1])
    cols = (idx[None] >= start[:, 1:]) & (idx[None] < start[:, 1:] + sides[:, 1:])
    box = rows[:, :, None] & cols[:, None, :]
    full = jax.random.bernoulli(k_full, full_prob, (batch, 1, 1))
    return (box | full).astype(jnp.float32)[..., None]


def masked_images(images, mask):
    """The part of the image that is kept; the region to generate becomes 0 (mid-gray)."""
    return images * (1.0 - mask)


def mask_to_latent(mask, factor: int):
    """A pixel mask -> latent resolution: a latent pixel is generated if any of its pixels is."""
    b, h, w, _ = mask.shape
    return mask.reshape(b, h // factor, factor, w // factor, factor, 1).max(axis=(2, 4))


def downsample(images, factor: int = LOWRES_FACTOR):
    """Average over factor x factor blocks (the low-resolution input of super-resolution)."""
    b, h, w, c = images.shape
    return images.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def space_to_depth(x, block: int):
    """(B, H, W, C) -> (B, H/block, W/block, C*block^2): every pixel kept, at latent size."""
    if block == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // block, block, w // block, block, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


def lowres_input(lowres, factor: int):
    """A low-resolution image (image size / 4) as channels at the latent resolution."""
    return space_to_depth(lowres, factor // LOWRES_FACTOR)
