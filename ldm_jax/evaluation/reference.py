"""Inception features of a dataset split, computed once and cached.

The cache key covers what changes the features: the network's weights (`network_id`), the
number of images, and the data themselves: the split's length and a hash of a spread of its
records (pixels and labels), so a regenerated dataset, another split or another image size
gets new features even under the same config.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np

from ldm_jax.data import pipeline
from ldm_jax.utils.paths import cache_root

_PROBES = 16  # records hashed for the fingerprint, spread over the split


def split_images(source, num: int) -> np.ndarray:
    """The first `num` images of a data source as uint8 (N, H, W, 3)."""
    if num > len(source):
        raise ValueError(f"asked for {num} reference images but the split has {len(source)}; "
                         "lower the number")
    return np.stack([np.asarray(source[i]["image"], np.uint8) for i in range(num)])


def fingerprint(source, num: int, network_id: str) -> str:
    h = hashlib.sha256(json.dumps({"len": len(source), "num": num,
                                   "network": network_id}).encode())
    for i in np.unique(np.linspace(0, len(source) - 1, _PROBES).astype(int)):
        record = source[int(i)]
        for key in sorted(record):
            value = record[key]
            h.update(key.encode())
            h.update(value if isinstance(value, bytes) else np.asarray(value).tobytes())
    return h.hexdigest()[:20]


def reference_features(data_config, split: str, num: int, extractor) -> tuple[dict, str]:
    """({"pool": (num, 2048)[, "logits"]}, note) for the first `num` images of `split`,
    read from the cache when present."""
    name = pipeline.split_name(data_config, split)
    source = pipeline.load_source(data_config, split=name)
    key = fingerprint(source, num, extractor.network_id)
    path = os.path.join(cache_root(), "reference", f"{data_config.name}_{name}_{num}_{key}.npz")
    if os.path.exists(path):
        with np.load(path) as stored:
            return dict(stored), f"reference features of {num} {name} images read from {path}"
    features = extractor(split_images(source, num))
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, **features)
        os.replace(tmp, path)  # never a half-written cache entry
    return features, f"reference features of {num} {name} images computed, cached in {path}"
