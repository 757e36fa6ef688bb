"""Training input: a random-access tfds source read with grain, sharded by process.

The global stream is fixed by the seed alone: element g of the stream is a reshuffled epoch
permutation of the source, and global batch k is elements [k*B, (k+1)*B). Process p reads only
its contiguous slice of each global batch, so any number of processes sees the same global
batches, and the iterator state (the next local index) is all a checkpoint needs to resume.
"""
from __future__ import annotations

import os

import grain
import numpy as np

from ldm_jax.data import image_files, tfds_source

_IMAGE_KEY = "image"
# What a latent cache record carries instead of the image (data/latents_source.py).
_CACHED_KEYS = ("latents", "context", "ids", "mask")


def default_data_dir(data_dir: str) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


class _SquareView:
    """A source whose records keep their aspect ratio, seen with centre-cropped square images:
    what everything but the training stream reads (sample grids, evaluation, latent scales)."""

    def __init__(self, source, size: int):
        self._source, self._size = source, size

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        record = dict(self._source[index])
        record[_IMAGE_KEY] = image_files.square_crop(np.asarray(record[_IMAGE_KEY]), self._size)
        return record

    def __getattr__(self, name):  # class names, skip counts, describe() ...
        return getattr(self._source, name)


def as_square(source, data_config):
    """`source` with centre-cropped square images, whichever way it was loaded."""
    if data_config.name in ("folder", "webdataset") and not isinstance(source, _SquareView):
        return _SquareView(source, data_config.image_size)
    return source


def load_source(data_config, split: str = "train", prepare: bool = True, square: bool = True):
    """The random-access source for `data_config.name` (prepared locally for the embedded set).
    Folder and tar-shard records keep their aspect ratio (shorter side = image_size) when
    `square` is False, for the training stream's own (random) crop; else they are centre-cropped."""
    source = _load_source(data_config, split, prepare)
    return as_square(source, data_config) if square else source


def _load_source(data_config, split: str, prepare: bool):
    data_config = tfds_source.resolve(data_config)
    data_dir = default_data_dir(data_config.data_dir)
    if data_config.name == "shapes":
        from ldm_jax.data import shapes, shapes_tfds
        kwargs = dict(image_size=data_config.image_size, num_train=data_config.num_train,
                      max_objects=data_config.get("max_objects", shapes.MAX_OBJECTS))
        if prepare:
            shapes_tfds.prepare_shapes(data_dir, **kwargs)
        return shapes_tfds.shapes_data_source(data_dir, split=split, **kwargs)
    if data_config.name == "tfds":
        return tfds_source.load(data_config, split, data_dir)
    if data_config.name == "folder":
        from ldm_jax.data.folder_source import FolderSource
        d = data_config
        return FolderSource(os.path.expanduser(d.path), d.image_size, split=split,
                            num_val=d.num_val, manifest=os.path.expanduser(d.manifest),
                            min_size=d.min_size, max_aspect=d.max_aspect)
    if data_config.name == "webdataset":
        from ldm_jax.data.webdataset_source import WebDatasetSource
        d = data_config
        return WebDatasetSource(d.path, d.image_size, caption_key=d.caption_key,
                                filters=d.filters)
    if data_config.name == "latents":
        from ldm_jax.data.latents_source import LatentsSource
        return LatentsSource(data_config.path, split)
    raise ValueError(f"unknown dataset {data_config.name!r}")


def caption_of(record) -> str:
    """A record's caption as str: tfds Text features give bytes, the other sources str."""
    caption = record["caption"]
    return caption.decode() if isinstance(caption, bytes) else str(caption)


def has_captions(data_config, source) -> bool:
    """Whether the records carry captions (for text-conditioned training)."""
    return data_config.name == "shapes" or bool(getattr(source, "has_captions", False))


def split_name(data_config, split: str) -> str:
    """The dataset's own name for `split`: 'validation' is the held-out split, which the
    shapes dataset calls 'test' and a tfds dataset without a 'validation' split too."""
    data_config = tfds_source.resolve(data_config)
    if split != "validation":
        return split
    if data_config.name == "shapes":
        return "test"
    if data_config.name == "tfds":
        return tfds_source.held_out_split(data_config, default_data_dir(data_config.data_dir))
    return split


def label_sizes(data_config) -> dict:
    """Label name -> number of values, for the labels `data_config.name` provides."""
    data_config = tfds_source.resolve(data_config)
    if data_config.name == "shapes":
        from ldm_jax.data import shapes
        return dict(shapes.LABEL_SIZES)
    if data_config.name == "tfds":
        if not data_config.label_key:
            return {}
        return {"label": tfds_source.num_classes(data_config,
                                                 default_data_dir(data_config.data_dir))}
    if data_config.name == "folder":  # class sub-folders, or a manifest's label column
        if data_config.class_names:  # a trained workdir's: no need for the folder
            return {"label": len(data_config.class_names)}
        classes = load_source(data_config).num_classes
        return {"label": classes} if classes else {}
    if data_config.name == "webdataset":
        return {}
    if data_config.name == "latents":  # the cached dataset's own labels
        from ldm_jax.data.latents_source import read_meta
        return dict(read_meta(os.path.expanduser(data_config.path))["label_sizes"])
    raise ValueError(f"unknown dataset {data_config.name!r}")


def stack_labels(element, label_keys) -> np.ndarray:
    """The (len(label_keys),) int32 label vector of one record."""
    return np.asarray([element[k] for k in label_keys], np.int32)


class _LoadAndPreprocess(grain.transforms.Map):
    """Global stream index -> float32 image in [-1, 1] (optionally flipped), plus the labels
    named in `label_keys` stacked into one int32 vector under 'labels', plus what
    `record_fields(record)` returns (e.g. caption tokens).

    The flip is drawn from (seed, global index), so it does not depend on the process layout.
    """

    def __init__(self, stream, random_flip: bool, seed: int, label_keys=(), record_fields=None,
                 image_size: int | None = None, random_crop: bool = False):
        self.stream, self.random_flip, self.seed = stream, random_flip, seed
        self.label_keys = tuple(label_keys)
        self.record_fields = record_fields
        self.image_size, self.random_crop = image_size, random_crop

    def map(self, g: int):
        element = self.stream[g]
        if _IMAGE_KEY not in element:  # a latent cache: encoded already, nothing to crop or flip
            out = {k: np.asarray(element[k]) for k in _CACHED_KEYS if k in element}
            return self._conditioning(element, out)
        image = np.asarray(element[_IMAGE_KEY])
        if self.image_size and image.shape[0] != image.shape[1]:
            # Sources keep the aspect ratio (shorter side = image_size); the crop is drawn from
            # (seed, global index) like the flip, so it does not depend on the process layout.
            offset = (np.random.default_rng([self.seed, g, 1]).random() if self.random_crop
                      else None)
            image = image_files.square_crop(image, self.image_size, offset)
        image = image.astype(np.float32) / 127.5 - 1.0
        if self.random_flip and np.random.default_rng([self.seed, g]).random() < 0.5:
            image = image[:, ::-1]
        return self._conditioning(element, {_IMAGE_KEY: image})

    def _conditioning(self, element, out):
        if self.label_keys:
            out["labels"] = stack_labels(element, self.label_keys)
        if self.record_fields is not None:
            out.update(self.record_fields(element))
        return out


def make_train_iterator(source, data_config, global_batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, label_keys=(),
                        record_fields=None):
    """A checkpointable iterator of this process's share of each global batch (numpy dicts)."""
    if global_batch_size % process_count:
        raise ValueError(f"batch size {global_batch_size} is not divisible by {process_count} processes")
    local = global_batch_size // process_count
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)

    def global_index(i: int) -> int:
        return (i // local) * global_batch_size + process_index * local + i % local

    ds = (grain.MapDataset.range(0, 2**62)
          .map(global_index)
          .map(_LoadAndPreprocess(stream, data_config.random_flip, seed, label_keys,
                                    record_fields, data_config.image_size,
                                    data_config.crop == "random"))
          .batch(local, drop_remainder=True))
    read = grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch)
    return iter(ds.to_iter_dataset(read))
