"""Any tfds dataset prepared in array_record format (`config.data.name = "tfds"`), read as a
random-access grain source without TensorFlow.

Each record becomes {"image": uint8 (S, S, 3), "label": int} (label when the dataset has
`data.label_key`): the image centre-cropped to a square and resized to `data.image_size`
(grayscale and RGBA made RGB), as LDM's ImageNet and CelebA-HQ loaders do.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_jax.config_checks import ConfigError


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


class TfdsSource:
    """A tfds data source with its image and label renamed and the image resized."""

    def __init__(self, source, image_key: str, label_key: str, image_size: int):
        self.source, self.image_key, self.label_key = source, image_key, label_key
        self.image_size = image_size

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
        return out


def _not_prepared(data, data_dir: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"tfds dataset {data.tfds_name!r} is not prepared in array_record format under "
        f"{data_dir!r}; run `tfds build {data.tfds_name} "
        "--file_format=array_record --data_dir=DIR` once and pass --config.data.data_dir=DIR")


def load(data, split: str, data_dir: str) -> TfdsSource:
    """`split` of data.tfds_name prepared under `data_dir`."""
    import tensorflow_datasets as tfds

    if not data.tfds_name:
        raise ConfigError("data.name='tfds' needs data.tfds_name (e.g. 'imagenet2012' or "
                          "'celeb_a_hq/256')")
    try:
        source = tfds.data_source(data.tfds_name, split=split, data_dir=data_dir,
                                  download=False)
    except Exception:  # tfds raises several types for "not prepared" / wrong format
        raise _not_prepared(data, data_dir) from None
    return TfdsSource(source, data.image_key, data.label_key, data.image_size)


def num_classes(data, data_dir: str) -> int:
    """data.num_classes, or the class count of the dataset's `label_key` ClassLabel feature."""
    if data.num_classes:
        return int(data.num_classes)
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(data.tfds_name, data_dir=data_dir)
        feature = builder.info.features[data.label_key]
    except KeyError:
        raise ConfigError(f"the dataset {data.tfds_name!r} has no {data.label_key!r} feature "
                          "(data.label_key)") from None
    except Exception:  # noqa: BLE001 - see load()
        raise _not_prepared(data, data_dir) from None
    n = getattr(feature, "num_classes", None)
    if not n:
        raise ConfigError(f"{data.tfds_name}'s {data.label_key!r} is not a ClassLabel; set "
                          "data.num_classes to the number of label values")
    return int(n)
