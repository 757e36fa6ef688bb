"""Tests for the procedural shapes dataset and its tfds builder."""

import os
import subprocess
import sys

import numpy as np
import pytest

import ldm_jax
from ldm_jax.data import shapes
from ldm_jax.data import shapes_tfds

N_TRAIN, N_TEST, SEED = 64, 16, 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    shapes_tfds.prepare_shapes(str(d), image_size=32, num_train=N_TRAIN,
                               num_test=N_TEST, seed=SEED)
    return str(d)


def _labels(ex):
    return {k: int(ex[k]) for k in shapes.LABEL_KEYS}


def test_vocabulary_sizes():
    assert len(shapes.COLORS) >= 6 and len(shapes.SHAPES) >= 4
    assert len(shapes.SIZES) == 2 and len(shapes.POSITIONS) == 9
    assert len(shapes.BACKGROUNDS) >= 3
    # Held-out pairs use each colour and each shape at most once.
    cols = [c for c, _ in shapes.HELD_OUT_PAIRS]
    shps = [s for _, s in shapes.HELD_OUT_PAIRS]
    assert len(set(cols)) == len(cols) and len(set(shps)) == len(shps)
    assert set(cols) <= set(shapes.COLORS) and set(shps) <= set(shapes.SHAPES)


def test_every_colour_visible_on_every_background():
    for bg in shapes.BACKGROUNDS:
        for c in shapes.COLORS:
            assert shapes.is_visible(c, bg), (c, bg)


def test_determinism_same_seed_identical():
    for split in ("train", "validation", "test"):
        for i in (0, 7, 123):
            a = shapes.generate_example(split, i, 32, seed=5)
            b = shapes.generate_example(split, i, 32, seed=5)
            assert a["image"].tobytes() == b["image"].tobytes()
            assert a["caption"] == b["caption"] and _labels(a) == _labels(b)


def test_determinism_different_seed_or_split_differs():
    a = [shapes.generate_example("train", i, 32, seed=0) for i in range(10)]
    b = [shapes.generate_example("train", i, 32, seed=1) for i in range(10)]
    c = [shapes.generate_example("validation", i, 32, seed=0) for i in range(10)]
    assert sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, b)) >= 8
    assert sum(x["image"].tobytes() != y["image"].tobytes() for x, y in zip(a, c)) >= 8


@pytest.mark.parametrize("size", [32, 64, 128])
def test_image_shape_and_dtype(size):
    ex = shapes.generate_example("train", 3, size)
    assert ex["image"].shape == (size, size, 3) and ex["image"].dtype == np.uint8
    assert isinstance(ex["caption"], str)


@pytest.mark.parametrize("size", [0, 16, 48, 1024])
def test_bad_size_raises(size):
    with pytest.raises(ValueError, match="32, 64, 128"):
        shapes.generate_example("train", 0, size)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        shapes.generate_example("training", 0, 32)


def test_caption_literal_format():
    one = {"num_objects": 1, "background": shapes.BACKGROUNDS.index("gray"),
           "color_0": shapes.COLORS.index("red"), "shape_0": shapes.SHAPES.index("circle"),
           "size_0": 0, "position_0": 0,
           "color_1": -1, "shape_1": -1, "size_1": -1, "position_1": -1}
    assert shapes.describe(one) == "a small red circle at the top left on a gray background"
    two = dict(one, num_objects=2, background=shapes.BACKGROUNDS.index("black"),
               color_0=shapes.COLORS.index("blue"), shape_0=shapes.SHAPES.index("square"),
               size_0=1, position_0=4, color_1=shapes.COLORS.index("yellow"),
               shape_1=shapes.SHAPES.index("triangle"), size_1=0, position_1=8)
    assert shapes.describe(two) == ("a large blue square in the center and a small yellow "
                                    "triangle at the bottom right on a black background")
    assert shapes.parse_caption(shapes.describe(two)) == two
    with pytest.raises(ValueError):
        shapes.parse_caption("a huge red circle in the center on a gray background")


def test_caption_agrees_with_labels():
    for split in ("train", "test"):
        for i in range(150):
            ex = shapes.generate_example(split, i, 32)
            assert shapes.parse_caption(ex["caption"]) == _labels(ex)
            assert shapes.describe(ex) == ex["caption"]


def test_label_structure():
    counts = {1: 0, 2: 0}
    for i in range(200):
        lab = _labels(shapes.generate_example("train", i, 32))
        counts[lab["num_objects"]] += 1
        if lab["num_objects"] == 1:
            assert all(lab[f"{a}_1"] == -1 for a in ("color", "shape", "size", "position"))
        else:
            # Distinct cells, mentioned in reading order.
            assert lab["position_0"] < lab["position_1"]
    assert counts[1] > 50 and counts[2] > 50


def test_held_out_split_property():
    for i in range(400):
        assert not shapes.contains_held_out(_labels(shapes.generate_example("train", i, 32)))
    for i in range(100):
        assert not shapes.contains_held_out(
            _labels(shapes.generate_example("validation", i, 32)))
    for i in range(200):
        assert shapes.contains_held_out(_labels(shapes.generate_example("test", i, 32)))


def test_attribute_coverage():
    seen = {k: set() for k in ("color", "shape", "size", "position")}
    backgrounds = set()
    for i in range(300):
        lab = _labels(shapes.generate_example("train", i, 32))
        backgrounds.add(lab["background"])
        for k in range(lab["num_objects"]):
            for a in seen:
                seen[a].add(lab[f"{a}_{k}"])
    assert len(seen["color"]) >= 6 and len(seen["shape"]) >= 4
    assert len(seen["size"]) == 2 and len(seen["position"]) == 9
    assert len(backgrounds) == len(shapes.BACKGROUNDS)


def _palette_counts(pixels, tol=12):
    """Per palette colour, how many pixels are within `tol` of it."""
    pix = pixels.reshape(-1, 3).astype(np.int32)
    return [int((np.abs(pix - np.array(shapes.COLOR_RGB[c])).max(-1) <= tol).sum())
            for c in shapes.COLORS]


@pytest.mark.parametrize("size", [32, 64])
def test_objects_rendered_where_caption_says(size):
    area = {0: [], 1: []}
    for i in range(120):
        ex = shapes.generate_example("train" if i % 2 else "test", i, size)
        lab = shapes.parse_caption(ex["caption"])
        img = ex["image"].astype(np.int32)
        bg = np.array(shapes.BACKGROUND_RGB[shapes.BACKGROUNDS[lab["background"]]])
        occupied = {}
        for k in range(lab["num_objects"]):
            occupied[lab[f"position_{k}"]] = (lab[f"color_{k}"], lab[f"size_{k}"])
        for pos in range(9):
            y0, y1, x0, x1 = shapes.cell_bounds(pos, size)
            cell = img[y0:y1, x0:x1]
            if pos in occupied:
                color, sz = occupied[pos]
                counts = _palette_counts(cell)
                # The named colour dominates the named cell.
                assert counts[color] >= 4 and counts[color] == max(counts), (i, pos, counts)
                area[sz].append(counts[color] / cell[..., 0].size)
            else:
                # Empty cells are plain background (1px margin for edge bleed).
                assert np.all(cell[1:-1, 1:-1] == bg), (i, pos)
    # Large objects cover clearly more of their cell than small ones.
    assert np.mean(area[1]) > 2.0 * np.mean(area[0])


def test_config_names_are_distinct():
    assert shapes_tfds.config_name(32, 64, 16, 3) == "s32_n64_t16_seed3"
    names = {shapes_tfds.make_config(s, n, t, seed).name
             for s in (32, 64) for n in (10, 20) for t in (5,) for seed in (0, 1)}
    assert len(names) == 8
    with pytest.raises(ValueError):
        shapes_tfds.make_config(image_size=100)


@pytest.mark.parametrize("split,num", [("train", N_TRAIN), ("test", N_TEST)])
def test_data_source_matches_generator(data_dir, split, num):
    src = shapes_tfds.shapes_data_source(data_dir, image_size=32, split=split,
                                         num_train=N_TRAIN, num_test=N_TEST, seed=SEED)
    assert len(src) == num
    for i in range(num):
        rec = src[i]
        ref = shapes.generate_example(split, i, 32, seed=SEED)
        assert isinstance(rec["caption"], bytes)
        assert rec["caption"].decode() == ref["caption"]
        assert rec["image"].dtype == np.uint8 and rec["image"].shape == (32, 32, 3)
        assert rec["image"].tobytes() == ref["image"].tobytes()
        assert _labels(rec) == _labels(ref)


def test_prepare_twice_does_not_regenerate(data_dir, monkeypatch):
    root = os.path.join(data_dir, "ldm_jax_shapes",
                        shapes_tfds.config_name(32, N_TRAIN, N_TEST, SEED))
    files = [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]
    assert any("array_record" in f for f in files)
    before = {f: os.stat(f).st_mtime_ns for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("dataset was regenerated")

    monkeypatch.setattr(shapes, "generate_example", fail)
    builder = shapes_tfds.prepare_shapes(data_dir, image_size=32, num_train=N_TRAIN,
                                         num_test=N_TEST, seed=SEED)
    assert builder.info.splits["train"].num_examples == N_TRAIN
    assert {f: os.stat(f).st_mtime_ns for f in files} == before


def test_no_tensorflow_and_no_network(tmp_path):
    # Fresh interpreter with sockets disabled: prepare, read, check modules.
    code = (
        "import socket, sys\n"
        "def no_net(*a, **k): raise RuntimeError('network access')\n"
        "socket.socket.connect = no_net\n"
        "socket.create_connection = no_net\n"
        "socket.getaddrinfo = no_net\n"
        "from ldm_jax.data import shapes_tfds\n"
        f"src = shapes_tfds.shapes_data_source({str(tmp_path)!r}, split='test',"
        " num_train=8, num_test=4)\n"
        "assert len(src) == 4 and src[3]['image'].shape == (32, 32, 3)\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('OK')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(ldm_jax.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]
    assert "tensorflow" not in sys.modules


def test_one_object_scenes(tmp_path):
    """max_objects=1: every scene holds one object, the test split still a held-out pair each,
    and the prepared data (under its own name) equals the generator's."""
    for split in ("train", "test"):
        for i in range(60):
            lab = _labels(shapes.generate_example(split, i, 32, max_objects=1))
            assert lab["num_objects"] == 1 and lab["position_1"] == -1
            assert shapes.contains_held_out(lab) == (split == "test")
    assert shapes_tfds.config_name(32, 8, 4, 0, max_objects=1) == "s32_n8_t4_seed0_o1"
    src = shapes_tfds.shapes_data_source(str(tmp_path), image_size=32, split="test",
                                         num_train=8, num_test=4, max_objects=1)
    for i in range(4):
        ref = shapes.generate_example("test", i, 32, max_objects=1)
        assert src[i]["image"].tobytes() == ref["image"].tobytes()
    with pytest.raises(ValueError, match="max_objects"):
        shapes.generate_example("train", 0, 32, max_objects=3)
