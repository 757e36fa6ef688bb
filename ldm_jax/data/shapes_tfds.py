"""tfds builder for the procedurally generated shapes dataset.

The data is written locally in array_record format, so preparing and reading
it needs neither TensorFlow nor the network. Images are stored as raw uint8
tensors (PNG encoding would need TensorFlow).

Reading back through `shapes_data_source` gives a random-access source whose
record ``i`` of a split equals ``shapes.generate_example(split, i, ...)``:
'image' is a read-only uint8 (S, S, 3) array (copy before editing in place),
label keys come back as Python ints and 'caption' as ``bytes`` (UTF-8);
decode with ``caption.decode()``.
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from ldm_jax.data import shapes

_NAME = "ldm_jax_shapes"
_SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 32
    num_train: int = 20000
    num_test: int = 2000
    seed: int = 0
    max_objects: int = shapes.MAX_OBJECTS


def config_name(image_size: int, num_train: int, num_test: int, seed: int,
                max_objects: int = shapes.MAX_OBJECTS) -> str:
    """Directory-safe name that encodes every parameter of the data (the two-object data
    keeps the name it had before max_objects existed)."""
    objects = "" if max_objects == shapes.MAX_OBJECTS else f"_o{max_objects}"
    return f"s{image_size}_n{num_train}_t{num_test}_seed{seed}{objects}"


def make_config(image_size: int = 32, num_train: int = 20000, num_test: int = 2000,
                seed: int = 0, max_objects: int = shapes.MAX_OBJECTS) -> ShapesConfig:
    shapes.check_image_size(image_size)
    shapes.check_max_objects(max_objects)
    if num_train < 1 or num_test < 1 or seed < 0:
        raise ValueError("num_train and num_test must be >= 1 and seed >= 0")
    name = config_name(image_size, num_train, num_test, seed, max_objects)
    # tfds refuses a new config object that shares a predefined config's name.
    predefined = ShapesBuilder.builder_configs.get(name)
    if predefined is not None:
        return predefined
    return ShapesConfig(name=name, image_size=image_size, num_train=num_train,
                        num_test=num_test, seed=seed, max_objects=max_objects,
                        description=(f"{image_size}px, {num_train} train / "
                                     f"{num_test} test, seed {seed}, "
                                     f"up to {max_objects} object(s)"))


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
    """Captioned coloured shapes on a 3x3 grid; test holds out colour/shape pairs."""

    name = _NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # Nothing is downloaded. Also skips tfds' checksum-file lookup, which
    # needs the optional `importlib_resources` package.
    url_infos = None
    BUILDER_CONFIGS = [
        ShapesConfig(name=config_name(s, 20000, 2000, 0), image_size=s)
        for s in shapes.ALLOWED_IMAGE_SIZES
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        features = {
            # Raw bytes: one buffer per image instead of one int64 per pixel
            # (about 5x faster to write), decoded with np.frombuffer.
            "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "caption": tfds.features.Text(),
        }
        for key in shapes.LABEL_KEYS:
            features[key] = tfds.features.Tensor(shape=(), dtype=np.int64)
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(features),
            # Keep generation order so record i == generate_example(split, i).
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is generated locally
        cfg = self.builder_config
        return {"train": self._generate_examples("train", cfg.num_train),
                "test": self._generate_examples("test", cfg.num_test)}

    def _generate_examples(self, split: str, num: int):
        cfg = self.builder_config
        for i in range(num):
            yield i, shapes.generate_example(split, i, cfg.image_size, cfg.seed,
                                             cfg.max_objects)


def _builder(data_dir: str, image_size: int, num_train: int, num_test: int,
             seed: int, max_objects: int) -> ShapesBuilder:
    return ShapesBuilder(data_dir=str(data_dir),
                         config=make_config(image_size, num_train, num_test, seed, max_objects),
                         file_format="array_record")


def prepare_shapes(data_dir: str, image_size: int = 32, num_train: int = 20000,
                   num_test: int = 2000, seed: int = 0,
                   max_objects: int = shapes.MAX_OBJECTS) -> ShapesBuilder:
    """Generate and write the dataset under `data_dir` once; later calls reuse it."""
    builder = _builder(data_dir, image_size, num_train, num_test, seed, max_objects)
    download_config = tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
        try_download_gcs=False,  # otherwise tfds asks GCS whether a copy exists
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
    )
    builder.download_and_prepare(download_config=download_config,
                                 file_format="array_record")
    return builder


def shapes_data_source(data_dir: str, image_size: int = 32, split: str = "train",
                       num_train: int = 20000, num_test: int = 2000, seed: int = 0,
                       max_objects: int = shapes.MAX_OBJECTS):
    """Random-access source (len / __getitem__) over a prepared split.

    Prepares the data first if needed. Records are dicts: 'image' read-only
    uint8 array, labels Python ints, 'caption' bytes.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    builder = prepare_shapes(data_dir, image_size, num_train, num_test, seed, max_objects)
    return builder.as_data_source(split=split)
