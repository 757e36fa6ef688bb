"""The labels a conditional model samples with: records of a split, or one parsed caption."""
from __future__ import annotations

import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline


def sampling_labels(config, num: int, split: str = "train", caption: str | None = None,
                    source=None):
    """(labels (num, K) int32, captions) for a model conditioned on config.model.label_keys,
    or (None, None) for an unconditional model.

    Without `caption`, the labels of the first `num` records of `split` (`source` if given);
    with it (shapes dataset only), `num` copies of the labels that caption describes.
    """
    keys = tuple(config.model.label_keys)
    if not keys:
        if caption is not None:
            raise ConfigError("this model is unconditional (model.label_keys is empty); "
                              "drop --caption")
        return None, None
    if caption is not None:
        if config.data.name != "shapes":
            raise ConfigError(f"--caption works for the shapes dataset only, not {config.data.name!r}")
        from ldm_jax.data import shapes
        try:
            record = shapes.parse_caption(caption)
        except ValueError:
            raise ConfigError(f"{caption!r} is not a shapes caption; write it like 'a large red "
                              "circle in the center on a gray background' (or two objects "
                              "joined by 'and')") from None
        return np.tile(pipeline.stack_labels(record, keys), (num, 1)), [caption] * num
    if source is None:
        source = pipeline.load_source(config.data, split=split)
    records = [source[i % len(source)] for i in range(num)]
    labels = np.stack([pipeline.stack_labels(r, keys) for r in records])
    captions = [r["caption"].decode() if "caption" in r
                else ", ".join(f"{k}={v}" for k, v in zip(keys, row))
                for r, row in zip(records, labels)]
    return labels, captions
