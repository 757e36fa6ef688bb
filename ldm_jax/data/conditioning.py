"""The labels a conditional model samples with: records of a split, or one parsed caption."""
from __future__ import annotations

import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline, tfds_source


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
    captions = [pipeline.caption_of(r) if "caption" in r
                else ", ".join(f"{k}={v}" for k, v in zip(keys, row))
                for r, row in zip(records, labels)]
    return labels, captions


def value_names(data, key: str):
    """The names of a label's values (index -> name), or None where the values are numbers.
    `data` is the config's data section (a folder's class names are kept in it)."""
    data = tfds_source.resolve(data)
    if data.name == "folder" and key == "label" and data.class_names:
        return tuple(data.class_names)
    if data.name == "tfds" and key == "label" and data.label_key:  # a ClassLabel's names
        return tfds_source.class_names(data, pipeline.default_data_dir(data.data_dir))
    if data.name == "shapes":
        from ldm_jax.data import shapes
        for prefix, names in (("color", shapes.COLORS), ("shape", shapes.SHAPES),
                              ("size", shapes.SIZES), ("position", shapes.POSITIONS),
                              ("background", shapes.BACKGROUNDS)):
            if key.startswith(prefix):
                return names
    return None


def class_labels(config, classes):
    """--class values -> (labels (N, K) int32, names). A model with one label takes its value
    as a number or a name (`3`, `triangle`); one with several takes `key=value` pairs joined
    by commas, every label named (`color_0=red,shape_0=circle`)."""
    keys = tuple(config.model.label_keys)
    sizes = pipeline.label_sizes(config.data)
    rows, names = [], []
    for text in classes:
        pairs = [p.split("=", 1) for p in str(text).split(",")] if "=" in str(text) else None
        if pairs is None:
            if len(keys) != 1:
                raise ConfigError(f"--class={text}: this model has {len(keys)} labels; write "
                                  f"them as key=value pairs joined by commas ({', '.join(keys)})")
            pairs = [(keys[0], str(text))]
        given = {k.strip(): v.strip() for k, v in pairs}
        unknown = sorted(set(given) - set(keys))
        missing = [k for k in keys if k not in given]
        if unknown or missing:
            raise ConfigError(f"--class={text}: " + (f"unknown labels {unknown}; " if unknown
                              else "") + (f"missing {missing}; " if missing else "")
                              + f"this model's labels are {list(keys)}")
        row = [_label_value(config.data, k, given[k], sizes[k], text) for k in keys]
        rows.append(row)
        named = [_value_name(config.data, k, v) for k, v in zip(keys, row)]
        names.append(named[0] if len(keys) == 1 else
                     ", ".join(f"{k}={n}" for k, n in zip(keys, named)))
    return np.asarray(rows, np.int32), names


def _label_value(data, key, value: str, size: int, text) -> int:
    names = value_names(data, key)
    if value.lstrip("-").isdigit():
        index = int(value)
    elif names is not None and value in names:
        return names.index(value)
    else:
        choices = f"0..{size - 1}" + (f" or one of {list(names)}" if names else "")
        raise ConfigError(f"--class={text}: {key}={value!r} is not {choices}")
    if not 0 <= index < size:
        raise ConfigError(f"--class={text}: {key}={index} is outside 0..{size - 1}")
    return index


def _value_name(data, key, index: int) -> str:
    names = value_names(data, key)
    return names[index] if names is not None else str(index)
