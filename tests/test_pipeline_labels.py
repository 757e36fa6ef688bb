"""The train iterator carries the labels a conditional model asks for, row-aligned with images."""
import numpy as np

from conftest import tiny_config
from ldm_jax.data import pipeline, shapes


def test_iterator_labels_belong_to_their_images(shapes_data_dir):
    config = tiny_config(shapes_data_dir)
    keys = ("background", "shape_0", "position_1")
    source = pipeline.load_source(config.data)
    by_image = {np.asarray(source[i]["image"]).tobytes(): source[i] for i in range(len(source))}
    it = pipeline.make_train_iterator(source, config.data, 8, seed=0, label_keys=keys)
    plain = pipeline.make_train_iterator(source, config.data, 8, seed=0)
    for _ in range(3):
        batch, unlabelled = next(it), next(plain)
        assert set(unlabelled) == {"image"}
        np.testing.assert_array_equal(batch["image"], unlabelled["image"])
        assert batch["labels"].shape == (8, 3) and batch["labels"].dtype == np.int32
        for image, labels in zip(batch["image"], batch["labels"]):
            record = by_image[np.rint((image + 1) * 127.5).astype(np.uint8).tobytes()]
            assert labels.tolist() == [record[k] for k in keys]
    assert {k: shapes.LABEL_SIZES[k] for k in keys} == {"background": 4, "shape_0": 5,
                                                        "position_1": 9}
