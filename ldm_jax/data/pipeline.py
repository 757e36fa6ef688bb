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

_IMAGE_KEY = "image"


def default_data_dir(data_dir: str) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def load_source(data_config, split: str = "train", prepare: bool = True):
    """The random-access source for `data_config.name` (prepared locally for the embedded set)."""
    data_dir = default_data_dir(data_config.data_dir)
    if data_config.name == "shapes":
        from ldm_jax.data import shapes_tfds
        kwargs = dict(image_size=data_config.image_size, num_train=data_config.num_train)
        if prepare:
            shapes_tfds.prepare_shapes(data_dir, **kwargs)
        return shapes_tfds.shapes_data_source(data_dir, split=split, **kwargs)
    if data_config.name == "cifar10":
        import tensorflow_datasets as tfds
        try:
            return tfds.data_source("cifar10", split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types for "not prepared" / wrong format
            raise FileNotFoundError(
                f"CIFAR-10 is not prepared in array_record format under {data_dir!r} ({type(e).__name__}); "
                "run `tfds build cifar10 --file_format=array_record --data_dir=DIR` once and pass "
                "--config.data.data_dir=DIR") from None
    if data_config.name == "tfds":
        from ldm_jax.data import tfds_source
        return tfds_source.load(data_config, split, data_dir)
    raise ValueError(f"unknown dataset {data_config.name!r}")


def split_name(data_config, split: str) -> str:
    """The dataset's own name for `split`: 'validation' is the held-out split, which the
    shapes dataset and CIFAR-10 call 'test'."""
    return "test" if split == "validation" and data_config.name in ("shapes", "cifar10") else split


def label_sizes(data_config) -> dict:
    """Label name -> number of values, for the labels `data_config.name` provides."""
    if data_config.name == "shapes":
        from ldm_jax.data import shapes
        return dict(shapes.LABEL_SIZES)
    if data_config.name == "cifar10":
        return {"label": 10}
    if data_config.name == "tfds":
        if not data_config.label_key:
            return {}
        from ldm_jax.data import tfds_source
        return {"label": tfds_source.num_classes(data_config,
                                                 default_data_dir(data_config.data_dir))}
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

    def __init__(self, stream, random_flip: bool, seed: int, label_keys=(), record_fields=None):
        self.stream, self.random_flip, self.seed = stream, random_flip, seed
        self.label_keys = tuple(label_keys)
        self.record_fields = record_fields

    def map(self, g: int):
        element = self.stream[g]
        image = np.asarray(element[_IMAGE_KEY], dtype=np.float32) / 127.5 - 1.0
        if self.random_flip and np.random.default_rng([self.seed, g]).random() < 0.5:
            image = image[:, ::-1]
        out = {_IMAGE_KEY: image}
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
                                    record_fields))
          .batch(local, drop_remainder=True))
    read = grain.ReadOptions(num_threads=data_config.num_threads, prefetch_buffer_size=data_config.prefetch)
    return iter(ds.to_iter_dataset(read))
