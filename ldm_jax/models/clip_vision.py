"""CLIP's vision tower (ViT), for CLIP score and image conditioning: the network of
transformers' CLIPVisionModelWithProjection, with parameter names that map one to one onto it:

    patch_embedding/kernel          (patch, patch, channels, width), no bias
    class_embedding                 (width,)
    position_embedding/embedding    ((image_size // patch) ** 2 + 1, width)
    pre_norm                        scale, bias (width,)          ("pre_layrnorm")
    layers_{i}/...                  the text encoder's TextBlock, not causal
    post_norm                       scale, bias (width,)          ("post_layernorm")
    projection/kernel               (width, projection_dim), no bias ("visual_projection")

Inputs are NHWC float images already resized, cropped and normalised as CLIP was trained:
`preprocess` does that from uint8 or [-1, 1] images.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.initializers import lecun_normal
from ldm_jax.models.text_encoder import ACTIVATIONS, TextBlock, _normal

Dtype = Any

# OpenAI CLIP's per-channel RGB statistics of its training images, in [0, 1] units
# (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD); OpenCLIP's ViT-H/bigG use the same.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images, size: int = 224):
    """(B, H, W, 3) images -> (B, size, size, 3) float32 CLIP inputs, as CLIPImageProcessor:
    bicubic resize of the shorter side to `size` (the longer side truncated to
    int(size * long / short)), centre crop to size x size, then (x - CLIP_MEAN) / CLIP_STD on
    [0, 1] values. uint8 images are read as 0..255, float images as [-1, 1] (our decoders' range).

    Differs from the PIL processor by its rounding to uint8 after the resize (about 1/255).
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images of shape {images.shape}; expected (batch, height, width, 3)")
    if images.dtype == jnp.uint8:
        x = images.astype(jnp.float32) / 255.0
    else:
        x = (images.astype(jnp.float32) + 1.0) / 2.0
    b, h, w, c = x.shape
    short, long = min(h, w), max(h, w)
    new_long = int(size * long / short)
    nh, nw = (size, new_long) if h <= w else (new_long, size)
    # Antialiased when shrinking, like PIL's resampling filters; PIL clamps to the pixel range.
    x = jnp.clip(jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True), 0.0, 1.0)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top:top + size, left:left + size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class VisionTransformer(nn.Module):
    """images (B, image_size, image_size, channels), normalised -> (last_hidden_state
    (B, 1 + patches, width), pooled (B, width), image_embeds (B, projection_dim) or None).

    As in CLIP, last_hidden_state is the last block's output without any final norm; pooled is
    post_norm of its class token; image_embeds its bias-free projection (CLIPVisionModel
    checkpoints have none: projection_dim=None).
    """
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    activation: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = 512
    channels: int = 3
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        want = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(f"images of shape {tuple(images.shape)}; this CLIP vision model takes "
                             f"(batch, *{want}): resize with clip_vision.preprocess(images, "
                             f"{self.image_size})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; use one of {tuple(ACTIVATIONS)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    dtype=self.dtype, kernel_init=lecun_normal, name="patch_embedding")(images)
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # patches in row-major order, as torch's flatten(2)
        cls = self.param("class_embedding", _normal(self.width ** -0.5), (self.width,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], 1)
        positions = nn.Embed(x.shape[1], self.width, dtype=self.dtype,
                             embedding_init=_normal(0.02), name="position_embedding")
        x = x + positions(jnp.arange(x.shape[1]))[None]
        norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
        x = norm("pre_norm")(x)
        for i in range(self.depth):
            x = TextBlock(self.heads, self.mlp_ratio, self.activation, False,
                          self.layer_norm_eps, self.dtype, name=f"layers_{i}")(x)
        pooled = norm("post_norm")(x[:, 0])
        embeds = None
        if self.projection_dim is not None:
            embeds = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                              kernel_init=lecun_normal, name="projection")(pooled)
        return x, pooled, embeds
