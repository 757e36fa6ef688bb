"""data.name=tfds reads any tfds dataset prepared in array_record format: images cropped and
resized, a ClassLabel's names for --class=NAME, Text captions, the held-out split the dataset
has; "cifar10" is shorthand for the tfds source of that name. The datasets here are tiny ones
written locally, as a user's `tfds build` would leave them."""
import dataclasses

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config
from ldm_jax import config_checks
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import conditioning, pipeline, tfds_source

_NAMES = ("cat", "dog", "bird")
_SPLITS = {"tt": ("train", "test"), "tvt": ("train", "validation", "test"), "t": ("train",)}
_NUM = {"train": 12, "validation": 4, "test": 6}


@dataclasses.dataclass(eq=False)
class _SplitsConfig(tfds.core.BuilderConfig):
    splits: tuple = ()


class LdmJaxTinyLabelled(tfds.core.GeneratorBasedBuilder):
    """Wide 12x16 pictures, a named class, a caption and a plain integer per example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Test data."}
    url_infos = None  # nothing to download; skips the checksum-file lookup
    BUILDER_CONFIGS = [_SplitsConfig(name=k, splits=v) for k, v in _SPLITS.items()]

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "picture": tfds.features.Tensor(shape=(12, 16, 3), dtype=np.uint8),
            "kind": tfds.features.ClassLabel(names=_NAMES),
            "text": tfds.features.Text(),
            "rating": tfds.features.Tensor(shape=(), dtype=np.int64),
        }), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in self.builder_config.splits}

    def _generate_examples(self, split):
        for i in range(_NUM[split]):
            picture = np.zeros((12, 16, 3), np.uint8)
            picture[:, 2:14] = 100 + i  # the centre square; the side columns are cropped off
            yield i, {"picture": picture, "kind": i % 3, "text": f"{split} {_NAMES[i % 3]} {i}",
                      "rating": i % 5}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_tfds"))
    download = tfds.download.DownloadConfig(try_download_gcs=False,
                                            compute_stats=tfds.download.ComputeStatsMode.SKIP)
    for variant in _SPLITS:
        LdmJaxTinyLabelled(data_dir=path, config=variant, file_format="array_record") \
            .download_and_prepare(download_config=download, file_format="array_record")
    return path


def _config(data_dir, variant="tt", **data):
    config = tiny_config(data_dir)
    d = config.data
    d.name, d.tfds_name, d.image_size = "tfds", f"ldm_jax_tiny_labelled/{variant}", 16
    d.image_key, d.label_key, d.caption_key = "picture", "kind", "text"
    d.update(data)
    return config


def test_records_are_cropped_resized_labelled_and_captioned(tiny_dir):
    data = _config(tiny_dir).data
    source = pipeline.load_source(data, split="train")
    record = source[4]
    assert len(source) == 12 and set(record) == {"image", "label", "caption"}
    assert record["image"].shape == (16, 16, 3)
    assert record["image"].min() == record["image"].max() == 104  # only the centre square left
    assert record["label"] == 1 and record["caption"] == "train dog 4"
    assert pipeline.has_captions(data, source) and pipeline.label_sizes(data) == {"label": 3}
    text = source.describe()
    for part in ("ldm_jax_tiny_labelled/tt", "(train)", "12 images", "16x16", "'kind'",
                 "3 classes", "'text'"):
        assert part in text, (part, text)


def test_missing_caption_feature_and_plain_integer_labels(tiny_dir):
    data = _config(tiny_dir, caption_key="no_such_feature").data
    source = pipeline.load_source(data)
    assert "caption" not in source[0] and not pipeline.has_captions(data, source)
    data.label_key = "rating"  # not a ClassLabel: its count comes from data.num_classes
    with pytest.raises(ConfigError, match="not a ClassLabel; set data.num_classes"):
        pipeline.label_sizes(data)
    data.num_classes = 5
    assert pipeline.label_sizes(data) == {"label": 5} and pipeline.load_source(data)[3]["label"] == 3
    assert conditioning.value_names(data, "label") is None  # numbers, no names


def test_class_names_come_from_the_class_label(tiny_dir):
    config = _config(tiny_dir)
    config.model.label_keys = ("label",)
    assert conditioning.value_names(config.data, "label") == _NAMES
    labels, names = conditioning.class_labels(config, ["bird", "0"])
    assert labels.tolist() == [[2], [0]] and names == ["bird", "cat"]
    with pytest.raises(ConfigError, match="one of \\['cat', 'dog', 'bird'\\]"):
        conditioning.class_labels(config, ["horse"])
    # A trained workdir's config keeps the names: sampling needs no dataset then.
    config.data.data_dir, config.data.class_names = "/no/such/dir", ("x", "y")
    assert conditioning.value_names(config.data, "label") == ("x", "y")
    assert pipeline.label_sizes(config.data) == {"label": 2}


def test_the_held_out_split_is_validation_else_test(tiny_dir):
    assert pipeline.split_name(_config(tiny_dir, "tvt").data, "validation") == "validation"
    data = _config(tiny_dir, "tt").data
    assert pipeline.split_name(data, "validation") == "test"
    assert pipeline.split_name(data, "train") == "train"
    assert len(pipeline.load_source(data, split=pipeline.split_name(data, "validation"))) == 6
    with pytest.raises(ConfigError, match=r"no held-out split \(it has \['train'\]\)"):
        pipeline.split_name(_config(tiny_dir, "t").data, "validation")
    with pytest.raises(ConfigError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        pipeline.load_source(data, split="validation")


def test_train_iterator_carries_the_labels(tiny_dir):
    data = _config(tiny_dir).data
    source = pipeline.load_source(data)
    batch = next(pipeline.make_train_iterator(source, data, 4, seed=0, label_keys=("label",)))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["labels"].shape == (4, 1)
    for image, label in zip(batch["image"], batch["labels"][:, 0]):
        index = int(round((image[0, 0, 0] + 1) * 127.5)) - 100  # the pixel value says which
        assert label == index % 3


def test_cifar10_is_shorthand_for_the_tfds_source(tmp_path):
    config = tiny_config(str(tmp_path))
    config.data.name, config.data.image_key, config.data.label_key = "cifar10", "x", ""
    resolved = tfds_source.resolve(config.data)
    assert (resolved.name, resolved.tfds_name, resolved.image_key, resolved.label_key) == \
        ("tfds", "cifar10", "image", "label")
    assert config.data.name == "cifar10"  # a copy: the saved config keeps its shorthand
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        pipeline.load_source(config.data)
    config_checks.check_data(config.data)  # 32x32: accepted
    config.data.image_size = 64
    with pytest.raises(ConfigError, match="CIFAR-10 images are 32x32"):
        config_checks.check_data(config.data)


def test_unprepared_dataset_and_non_square_resize(tmp_path):
    data = tiny_config(str(tmp_path)).data
    data.name, data.tfds_name = "tfds", "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="tfds build no_such_dataset"):
        pipeline.load_source(data, split="train")
    gray = np.zeros((40, 20), np.uint8)  # tall grayscale: centre square, resized, made RGB
    gray[10:30] = 200
    out = tfds_source.center_crop_resize(gray, 10)
    assert out.shape == (10, 10, 3) and out.min() == 200
