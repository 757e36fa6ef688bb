"""The VQ autoencoder of taming-transformers / LDM's VQ first stages: the KL model's encoder and
decoder around a vector quantiser instead of a Gaussian posterior."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import Decoder, Encoder
from ldm_jax.models.layers import _conv
from ldm_jax.models.quantizer import VectorQuantizer


class AutoencoderVQ(nn.Module):
    """Encoder -> 1x1 quant_conv -> VectorQuantizer -> 1x1 post_quant_conv -> Decoder.

    `__call__(x, key=None, train=...)` returns (reconstruction, (codebook loss, info)); `key` is
    ignored (a VQ model is deterministic) and kept so both kinds share one call signature.
    Dead-code restarts draw from the "vq_restart" rng stream.
    """
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    z_channels: int = 3
    embed_dim: int = 3
    n_embed: int = 8192
    beta: float = 0.25
    legacy: bool = True
    ema: bool = False
    ema_decay: float = 0.99
    restart_dead_codes: bool = False
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    resolution: int = 256
    norm_groups: int = 32
    dtype: Any = jnp.float32

    def setup(self):
        shared = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), z_channels=self.z_channels,
                      dropout=self.dropout, resolution=self.resolution,
                      norm_groups=self.norm_groups, dtype=self.dtype)
        self.encoder = Encoder(**shared, in_channels=self.in_channels, double_z=False)
        self.decoder = Decoder(**shared, out_channels=self.out_channels)
        self.quant_conv = _conv(self.embed_dim, kernel=1, dtype=self.dtype)
        self.post_quant_conv = _conv(self.z_channels, kernel=1, dtype=self.dtype)
        self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, beta=self.beta,
                                        legacy=self.legacy, ema=self.ema, decay=self.ema_decay,
                                        restart_dead_codes=self.restart_dead_codes)

    def encode(self, x, train: bool = False):
        """Images -> (quantised latents, codebook loss, info)."""
        return self.quantize(self.quant_conv(self.encoder(x, train)), train)

    def decode(self, zq, train: bool = False) -> jax.Array:
        return self.decoder(self.post_quant_conv(zq.astype(self.dtype)), train).astype(jnp.float32)

    def __call__(self, x, key: jax.Array | None = None, *, train: bool = False):
        zq, loss, info = self.encode(x, train)
        return self.decode(zq, train), (loss, info)
