"""Any tfds dataset prepared in array_record format (`config.data.name = "tfds"`), read as a
random-access grain source without TensorFlow.

Each record becomes {"image": uint8 (S, S, 3)} plus "label": int when the dataset has
`data.label_key` and "caption": str when it has `data.caption_key`: the image centre-cropped
to a square and resized to `data.image_size` (grayscale and RGBA made RGB), as LDM's ImageNet
and CelebA-HQ loaders do. `data.name = "cifar10"` is shorthand for tfds_name "cifar10" (older
workdirs say so); `dataset_names.resolve` spells it out, and every reader of the data config goes through it.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image

from ldm_jax.config_checks import ConfigError
from ldm_jax.data.dataset_names import resolve

def center_crop_resize(image, size: int) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image.astype(np.uint8)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = Image.fromarray(image[top:top + side, left:left + side].astype(np.uint8))
    return np.asarray(square.resize((size, size), Image.BICUBIC, reducing_gap=3.0))


def _text(value) -> str:
    # tfds Text features decode to bytes; the folder and tar-shard sources give str.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class TfdsSource:
    """A tfds data source with its image, label and caption renamed and the image resized.

    Attributes: `name`, `split`, `image_size`, the three keys (label and caption keys "" when
    the dataset lacks them), `has_captions`, `class_names` (a ClassLabel's names, else ()).
    """

    def __init__(self, source, image_key: str, label_key: str, image_size: int,
                 caption_key: str = "", class_names=(), name: str = "", split: str = ""):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.caption_key, self.has_captions = caption_key, bool(caption_key)
        self.image_size, self.class_names = image_size, tuple(class_names)
        self.name, self.split = name, split

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        if self.image_key not in record:
            raise ConfigError(f"the dataset's records have no {self.image_key!r} "
                              f"(data.image_key); they have {sorted(record)}")
        out = {"image": center_crop_resize(record[self.image_key], self.image_size)}
        if self.label_key and self.label_key in record:
            out["label"] = int(record[self.label_key])
        if self.caption_key and self.caption_key in record:
            out["caption"] = _text(record[self.caption_key])
        return out

    def describe(self) -> str:
        parts = [f"tfds {self.name} ({self.split}): {len(self)} images at "
                 f"{self.image_size}x{self.image_size} from {self.image_key!r}"]
        if self.label_key:
            parts.append(f"label {self.label_key!r}" + (f" ({len(self.class_names)} classes)"
                                                        if self.class_names else ""))
        if self.caption_key:
            parts.append(f"captions {self.caption_key!r}")
        return ", ".join(parts)


def _not_prepared(name: str, data_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in array_record format under {data_dir!r}; "
        f"run `tfds build {name} --file_format=array_record --data_dir=DIR` once and pass "
        "--config.data.data_dir=DIR")


@functools.lru_cache(maxsize=16)
def _builder(name: str, data_dir: str):
    """The prepared builder of `name` (its features and splits come from data_dir's files)."""
    import tensorflow_datasets as tfds

    if not name:
        raise ConfigError("data.name='tfds' needs data.tfds_name (e.g. 'imagenet2012' or "
                          "'celeb_a_hq/256')")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception:  # tfds raises several types for "unknown" / unreadable
        raise _not_prepared(name, data_dir) from None
    if not builder.is_prepared():  # raising keeps an unprepared builder out of the cache
        raise _not_prepared(name, data_dir)
    return builder


def _features(data, data_dir: str):
    return _builder(data.tfds_name, data_dir).info.features


def load(data, split: str, data_dir: str) -> TfdsSource:
    """`split` of data.tfds_name prepared under `data_dir`."""
    data = resolve(data)
    builder = _builder(data.tfds_name, data_dir)
    splits = sorted(builder.info.splits)
    if any(part.split("[")[0].strip() not in splits for part in split.split("+")):
        raise ConfigError(f"tfds dataset {data.tfds_name!r} has no split {split!r}; it has "
                          f"{splits}: ask for one of those")
    try:
        source = builder.as_data_source(split=split)
    except Exception:  # noqa: BLE001 - e.g. prepared as TFRecord, which needs TensorFlow
        raise _not_prepared(data.tfds_name, data_dir) from None
    features = builder.info.features
    label_key = data.label_key if data.label_key in features else ""
    caption_key = data.get("caption_key", "")
    return TfdsSource(source, data.image_key, label_key, data.image_size,
                      caption_key if caption_key in features else "",
                      _label_names(features, label_key) or (), data.tfds_name, split)


def held_out_split(data, data_dir: str) -> str:
    """The dataset's held-out split: 'validation' where it has one, else 'test'."""
    data = resolve(data)
    splits = _builder(data.tfds_name, data_dir).info.splits
    for name in ("validation", "test"):
        if name in splits:
            return name
    raise ConfigError(f"tfds dataset {data.tfds_name!r} has no held-out split (it has "
                      f"{sorted(splits)}); prepare it with a 'validation' or 'test' split, "
                      "or ask for split 'train'")


def class_names(data, data_dir: str):
    """The names of the label_key ClassLabel's values, or None (no such feature, or no
    ClassLabel). A trained workdir's config keeps them: sampling needs no dataset then."""
    data = resolve(data)
    if data.get("class_names"):
        return tuple(data.class_names)
    return _label_names(_features(data, data_dir), data.label_key)


def _label_names(features, key: str):
    if not key or key not in features:
        return None
    names = getattr(features[key], "names", None)
    return tuple(names) if names else None


def num_classes(data, data_dir: str) -> int:
    """data.num_classes, or the class count of the dataset's `label_key` ClassLabel feature
    (of the names a trained workdir's config keeps, without reading the dataset)."""
    data = resolve(data)
    if data.get("num_classes") or data.get("class_names"):
        return int(data.get("num_classes") or len(data.class_names))
    features = _features(data, data_dir)
    if data.label_key not in features:
        raise ConfigError(f"the dataset {data.tfds_name!r} has no {data.label_key!r} feature "
                          "(data.label_key)")
    n = getattr(features[data.label_key], "num_classes", None)
    if not n:
        raise ConfigError(f"{data.tfds_name}'s {data.label_key!r} is not a ClassLabel; set "
                          "data.num_classes to the number of label values")
    return int(n)
