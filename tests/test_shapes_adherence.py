"""Tests for the shapes-dataset reader (image -> labels) and the adherence score built on it."""
import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.evaluation import shapes_adherence as adh
from ldm_jax.evaluation.shapes_reader import read_scene, read_scenes

NUM = 400
OBJECT_ONLY = ("color", "shape", "size", "position")


@pytest.fixture(scope="module", params=[32, 64])
def test_split(request):
    size = request.param
    examples = [shapes.generate_example("test", i, size) for i in range(NUM)]
    return size, np.stack([e["image"] for e in examples]), examples


def _assert_at_least(acc, floor, what):
    low = {a: acc[a] for a in adh.ATTRIBUTES if a != "all" and acc[a] < floor}
    assert not low, f"{what}: attributes below {floor}: {low}"


def test_reads_clean_test_split(test_split):
    size, images, examples = test_split
    acc = adh.adherence(read_scenes(images), examples)
    assert acc["n"] == NUM
    _assert_at_least(acc, 0.99, f"clean {size}px")
    assert acc["all"] >= 0.99


def test_reads_noisy_test_split(test_split):
    size, images, examples = test_split
    noisy = adh.corrupt(images, adh.DEFAULT_NOISE, seed=123)
    assert np.abs(noisy.astype(int) - images).mean() > 5  # the noise is really there
    _assert_at_least(adh.adherence(read_scenes(noisy), examples), 0.95, f"noisy {size}px")


@pytest.mark.parametrize("size", [128, 256, 512])
def test_reads_large_sizes(size):
    examples = [shapes.generate_example("test", i, size) for i in range(12)]
    readings = [read_scene(e["image"]) for e in examples]
    assert adh.adherence(readings, examples)["all"] == 1.0


def _change(labels, attr, rng):
    """A copy of `labels` with object 0's `attr` (or the background) changed to a valid value."""
    new = dict(labels)
    bg = shapes.BACKGROUNDS[labels["background"]]
    if attr == "color":
        options = [c for c in range(len(shapes.COLORS))
                   if c != labels["color_0"] and shapes.is_visible(shapes.COLORS[c], bg)]
        new["color_0"] = int(rng.choice(options))
    elif attr == "shape":
        n = len(shapes.SHAPES)
        new["shape_0"] = (labels["shape_0"] + int(rng.integers(1, n))) % n
    elif attr == "size":
        new["size_0"] = 1 - labels["size_0"]
    elif attr == "position":
        used = {labels[f"position_{k}"] for k in range(labels["num_objects"])}
        new["position_0"] = int(rng.choice([p for p in range(9) if p not in used]))
    else:
        colors = [shapes.COLORS[labels[f"color_{k}"]] for k in range(labels["num_objects"])]
        options = [b for b, name in enumerate(shapes.BACKGROUNDS) if b != labels["background"]
                   and all(shapes.is_visible(c, name) for c in colors)]
        if not options:
            return None
        new["background"] = int(rng.choice(options))
    return new


@pytest.mark.parametrize("attr", ["color", "shape", "size", "position", "background"])
def test_changed_attribute_is_caught(attr):
    rng = np.random.default_rng(7)
    originals, images = [], []
    for i in range(40):
        labels = {k: shapes.generate_example("test", i, 32)[k] for k in shapes.LABEL_KEYS}
        changed = _change(labels, attr, rng)
        if changed is not None:
            offsets = rng.uniform(-1, 1, (labels["num_objects"], 2))
            originals.append(labels)
            images.append(shapes.render(changed, 32, offsets))
    assert len(originals) >= 20
    acc = adh.adherence(read_scenes(np.stack(images)), originals)
    assert acc[attr] == 0.0 and acc["all"] == 0.0
    others = [a for a in adh.ATTRIBUTES if a not in (attr, "all")]
    assert all(acc[a] == 1.0 for a in others), acc


TWO = shapes.parse_caption("a small red circle at the top left and a large blue square "
                           "in the center on a white background")


def _reading(**changes):
    reading = dict(TWO)
    reading.update(changes)
    return reading


def test_perfect_reading_and_caption_labels():
    caption = shapes.describe(TWO)
    assert adh.image_scores(_reading(), caption) == {a: True for a in adh.ATTRIBUTES}


def test_missing_object_is_wrong_for_all_object_attributes():
    missing = _reading(num_objects=1, color_1=-1, shape_1=-1, size_1=-1, position_1=-1)
    scores = adh.image_scores(missing, TWO)
    assert scores["background"]
    assert not any(scores[a] for a in ("num_objects", *OBJECT_ONLY, "all"))


def test_extra_object_is_wrong_for_all_object_attributes():
    one = _reading(num_objects=1, color_1=-1, shape_1=-1, size_1=-1, position_1=-1)
    scores = adh.image_scores(_reading(), one)  # a second object nobody asked for
    assert scores["background"]
    assert not any(scores[a] for a in ("num_objects", *OBJECT_ONLY, "all"))
    # More objects than slots: the two slots match, the third is extra.
    scores = adh.image_scores(_reading(num_objects=3), TWO)
    assert not any(scores[a] for a in ("num_objects", *OBJECT_ONLY))


def test_wrong_cell_costs_position_only():
    moved = _reading(position_1=8)
    scores = adh.image_scores(moved, TWO)
    assert not scores["position"] and not scores["all"]
    assert all(scores[a] for a in ("background", "num_objects", "color", "shape", "size"))
    # Swapped objects: both cells are right, the objects in them are not.
    swapped = _reading(color_0=TWO["color_1"], color_1=TWO["color_0"])
    scores = adh.image_scores(swapped, TWO)
    assert scores["position"] and not scores["color"] and scores["shape"]


def test_seen_and_held_out_groups():
    seen = [shapes.generate_example("train", i, 32) for i in range(6)]
    held = [shapes.generate_example("test", i, 32) for i in range(4)]
    assert not any(map(shapes.contains_held_out, seen))
    labels = seen + held
    readings = [{k: e[k] for k in shapes.LABEL_KEYS} for e in labels]
    for r in readings[:6]:  # misread only the seen group's background
        r["background"] = (r["background"] + 1) % len(shapes.BACKGROUNDS)
    groups = adh.adherence_by_group(readings, labels)
    assert groups["seen"]["n"] == 6 and groups["held_out"]["n"] == 4
    assert groups["seen"]["background"] == 0.0 and groups["seen"]["color"] == 1.0
    assert groups["held_out"]["all"] == 1.0
    empty = adh.adherence_by_group(readings[6:], held)["seen"]
    assert empty["n"] == 0 and np.isnan(empty["all"])


@pytest.mark.parametrize("image, needle", [
    (np.zeros((32, 32, 3), np.float32), "dtype float32"),
    (np.zeros((32, 32), np.uint8), "shape (32, 32)"),
    (np.zeros((48, 48, 3), np.uint8), "shape (48, 48, 3)"),
    (np.zeros((2, 32, 32, 3), np.uint8), "read_scenes"),
])
def test_bad_images_fail_in_one_line(image, needle):
    with pytest.raises(ValueError) as err:
        read_scene(image)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_length_mismatch_and_bad_labels():
    with pytest.raises(ValueError, match="2 readings but 1 labels"):
        adh.adherence([TWO, TWO], [TWO])
    with pytest.raises(ValueError, match="lack keys"):
        adh.adherence([TWO], [{"background": 0}])


def test_validation_command_prints_table(capsys):
    assert adh.main(["--image_size=32", "--num=8", "--noise=20"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("clean", "noise"))]
    assert [r[:2] for r in rows] == [["clean", "1.0000"], ["noise", "20"], ["noise", "20"]]
    assert "blur" in out and "ms/image" in out
