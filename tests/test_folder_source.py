"""FolderSource: layouts, labels, captions, manifests, resizing, splits, bad files, filters and
errors, on small image folders written here."""
import io
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config_checks import ConfigError
from ldm_jax.data.folder_source import FolderSource

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save(path, size=(24, 24), color=RED, mode="RGB", fmt=None):
    """A solid image at `path` (folders made); `size` is (width, height)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if mode == "L":
        image = Image.new("L", size, color)
    elif mode == "P":
        image = Image.new("RGB", size, color).convert("P", palette=Image.ADAPTIVE, colors=4)
    elif mode == "RGBA":
        image = Image.new("RGBA", size, color)
    else:
        image = Image.new("RGB", size, color)
    image.save(path, format=fmt)
    return path


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def mean_color(record):
    return tuple(int(round(c)) for c in record["image"].reshape(-1, 3).mean(0))


def assert_close(color, expected, tol=6):
    assert all(abs(a - b) <= tol for a, b in zip(color, expected)), (color, expected)


def png_bytes(size=(24, 24), color=RED):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# -- layouts --------------------------------------------------------------------------------

def test_class_folders_labels_names_and_modes(tmp_path):
    save(tmp_path / "dogs" / "a.png", color=RED)
    save(tmp_path / "cats" / "x" / "b.jpg", color=100, mode="L")  # nested, grayscale
    save(tmp_path / "cats" / "c.webp", color=(0, 0, 255, 0), mode="RGBA")  # fully transparent
    save(tmp_path / "birds" / "d.PNG", color=GREEN, mode="P")  # upper-case extension, palette
    write(str(tmp_path / "cats" / ".DS_Store"), b"junk")  # hidden files are ignored
    write(str(tmp_path / "cats" / "._c.webp"), b"junk")
    write(str(tmp_path / "README.md"), "not an image")
    os.makedirs(tmp_path / "empty_class")  # holds no images: not a class

    source = FolderSource(str(tmp_path), image_size=16)
    assert source.layout == "classes"
    assert source.class_names == ["birds", "cats", "dogs"]
    assert source.num_classes == 3 and not source.has_captions
    assert len(source) == 4
    # Sorted by relative path: birds/d.PNG, cats/c.webp, cats/x/b.jpg, dogs/a.png.
    records = [source[i] for i in range(4)]
    assert [r["label"] for r in records] == [0, 1, 1, 2]
    for r in records:
        assert set(r) == {"image", "label"}
        assert r["image"].dtype == np.uint8 and r["image"].shape == (16, 16, 3)
    assert_close(mean_color(records[0]), GREEN)
    assert_close(mean_color(records[1]), (255, 255, 255))  # transparent on white
    assert_close(mean_color(records[2]), (100, 100, 100))
    assert_close(mean_color(records[3]), RED)
    assert source.skipped.count == 0


def test_single_sub_folder_is_plain_images(tmp_path):
    save(tmp_path / "train" / "a.png")
    save(tmp_path / "train" / "b.png")
    source = FolderSource(str(tmp_path), 16)
    assert source.layout == "images" and source.num_classes == 0 and source.class_names == []
    assert set(source[0]) == {"image"}


def test_images_at_top_level_are_not_classes(tmp_path):
    save(tmp_path / "top.png")
    save(tmp_path / "a" / "x.png")
    save(tmp_path / "b" / "y.jpg", fmt="JPEG")
    source = FolderSource(str(tmp_path), 16)
    assert source.layout == "images" and len(source) == 3
    assert [os.path.relpath(p, tmp_path) for p in source.paths] == [
        os.path.join("a", "x.png"), os.path.join("b", "y.jpg"), "top.png"]
    assert all(set(source[i]) == {"image"} for i in range(3))


def test_captions_and_missing_count(tmp_path):
    save(tmp_path / "a.JPG", color=RED, fmt="JPEG")
    write(str(tmp_path / "a.txt"), "  a red square \n")
    save(tmp_path / "sub" / "b.png", color=150, mode="L")
    write(str(tmp_path / "sub" / "b.txt"), "a grey one")
    save(tmp_path / "c.webp", color=BLUE)  # no caption file

    source = FolderSource(str(tmp_path), 16)
    assert source.layout == "captions" and source.has_captions
    assert source.missing_captions == 1 and source.num_classes == 0
    records = [source[i] for i in range(len(source))]
    # Order: a.JPG, c.webp, sub/b.png.
    assert [r["caption"] for r in records] == ["a red square", "", "a grey one"]
    assert all(set(r) == {"image", "caption"} for r in records)
    assert_close(mean_color(records[1]), BLUE)
    assert_close(mean_color(records[2]), (150, 150, 150))


def test_csv_manifest_relative_paths_and_labels(tmp_path):
    save(tmp_path / "imgs" / "one.png", color=RED)
    save(tmp_path / "imgs" / "deep" / "two.jpg", color=GREEN, fmt="JPEG")
    write(str(tmp_path / "meta" / "train.csv"),
          'path,caption,label\n'
          '../imgs/deep/two.jpg,"green, square",3\n'
          '../imgs/one.png,red,0\n'
          '../imgs/one.png,  also red  ,1\n')
    source = FolderSource("", 16, manifest=str(tmp_path / "meta" / "train.csv"))
    assert source.layout == "manifest" and source.has_captions
    assert source.num_classes == 4  # labels 0..3
    records = [source[i] for i in range(3)]  # rows keep the manifest's order
    assert [r["caption"] for r in records] == ["green, square", "red", "also red"]
    assert [r["label"] for r in records] == [3, 0, 1]
    assert_close(mean_color(records[0]), GREEN)
    assert_close(mean_color(records[1]), RED)


def test_jsonl_manifest_without_labels_found_under_path(tmp_path):
    save(tmp_path / "a.png", color=RED)
    save(tmp_path / "b" / "c.webp", color=BLUE)
    write(str(tmp_path / "list.jsonl"),
          json.dumps({"path": "b/c.webp", "caption": "blue"}) + "\n\n" +
          json.dumps({"path": "a.png"}) + "\n")
    source = FolderSource(str(tmp_path), 16, manifest="list.jsonl")  # looked up under path
    assert source.layout == "manifest" and source.num_classes == 0
    records = [source[0], source[1]]
    assert [set(r) for r in records] == [{"image", "caption"}] * 2
    assert [r["caption"] for r in records] == ["blue", ""]
    assert_close(mean_color(records[0]), BLUE)


def test_manifest_errors_name_the_row(tmp_path):
    save(tmp_path / "a.png")
    write(str(tmp_path / "m.csv"), "path,caption\na.png,x\nmissing.png,y\n")
    with pytest.raises(ConfigError, match=r"line 3 names 'missing.png'") as e:
        FolderSource(str(tmp_path), 16, manifest=str(tmp_path / "m.csv"))
    assert "\n" not in str(e.value)
    write(str(tmp_path / "l.jsonl"),
          '{"path": "a.png", "label": 0}\n{"path": "a.png", "label": "cat"}\n')
    with pytest.raises(ConfigError, match=r"line 2 has label 'cat'"):
        FolderSource("", 16, manifest=str(tmp_path / "l.jsonl"))
    write(str(tmp_path / "n.csv"), "file,caption\na.png,x\n")
    with pytest.raises(ConfigError, match="no path column"):
        FolderSource("", 16, manifest=str(tmp_path / "n.csv"))
    with pytest.raises(ConfigError, match="does not exist"):
        FolderSource("", 16, manifest=str(tmp_path / "nope.csv"))


# -- resizing -------------------------------------------------------------------------------

def test_shorter_side_resize_keeps_orientation(tmp_path):
    wide = Image.new("RGB", (40, 20), RED)
    wide.paste(BLUE, (20, 0, 40, 20))  # right half blue
    wide.save(tmp_path / "a_wide.png")
    tall = Image.new("RGB", (20, 40), RED)
    tall.paste(BLUE, (0, 20, 20, 40))  # bottom half blue
    tall.save(tmp_path / "b_tall.png")
    source = FolderSource(str(tmp_path), 16)
    w, t = source[0]["image"], source[1]["image"]
    assert w.shape == (16, 32, 3) and t.shape == (32, 16, 3)
    assert_close(tuple(w[:, :12].reshape(-1, 3).mean(0)), RED)
    assert_close(tuple(w[:, 20:].reshape(-1, 3).mean(0)), BLUE)
    assert_close(tuple(t[:12].reshape(-1, 3).mean(0)), RED)
    assert_close(tuple(t[20:].reshape(-1, 3).mean(0)), BLUE)


# -- splits ---------------------------------------------------------------------------------

def test_splits(tmp_path):
    names = [f"{i}.png" for i in range(5)]
    for i, name in enumerate(reversed(names)):  # written out of order
        save(tmp_path / name, color=(i * 50, 0, 0))
    rel = lambda s: [os.path.basename(p) for p in s.paths]  # noqa: E731
    train = FolderSource(str(tmp_path), 16, split="train", num_val=2)
    val = FolderSource(str(tmp_path), 16, split="validation", num_val=2)
    assert rel(train) == names[:3] and rel(val) == names[3:]
    whole_train = FolderSource(str(tmp_path), 16, split="train")
    whole_val = FolderSource(str(tmp_path), 16, split="validation")
    assert rel(whole_train) == rel(whole_val) == names
    with pytest.raises(ValueError, match="'test'"):
        FolderSource(str(tmp_path), 16, split="test")
    with pytest.raises(ConfigError, match="num_val=5 holds out all 5"):
        FolderSource(str(tmp_path), 16, num_val=5)


# -- bad files ------------------------------------------------------------------------------

def make_bad_folder(root):
    save(root / "0_good.png", color=RED)
    write(str(root / "1_corrupt.jpg"), bytes(range(256)) * 4)
    write(str(root / "2_truncated.png"), png_bytes((64, 64), GREEN)[:120])
    save(root / "3_good.webp", color=GREEN)
    write(str(root / "4_zero.jpg"), b"")
    write(str(root / "5_text.jpg"), "this is not a jpeg\n")


def test_bad_files_are_skipped_to_the_next_good_index(tmp_path):
    make_bad_folder(tmp_path)
    source = FolderSource(str(tmp_path), 16)
    assert len(source) == 6 and source.skipped.count == 0
    colors = [mean_color(source[i]) for i in range(6)]
    # 1, 2 -> 3 (green); 4, 5 -> wrap to 0 (red).
    for i, expected in enumerate([RED, GREEN, GREEN, GREEN, RED, RED]):
        assert_close(colors[i], expected)
    assert source.skipped.count == 2 + 1 + 2 + 1
    assert "5_text.jpg" in source.skipped.last

    again = FolderSource(str(tmp_path), 16)
    for i in range(6):
        np.testing.assert_array_equal(source[i]["image"], again[i]["image"])
    assert "unreadable" in source.describe()


def test_vanished_file_and_all_bad(tmp_path):
    save(tmp_path / "a.png", color=RED)
    save(tmp_path / "b.png", color=GREEN)
    source = FolderSource(str(tmp_path), 16)
    os.remove(tmp_path / "a.png")
    assert_close(mean_color(source[0]), GREEN)
    assert source.skipped.count == 1 and "FileNotFoundError" in source.skipped.last
    os.remove(tmp_path / "b.png")
    with pytest.raises(ConfigError, match="none of the 2 train images") as e:
        source[1]
    assert "\n" not in str(e.value)
    with pytest.raises(IndexError):
        source[2]


def test_pickled_copy_reads_the_same(tmp_path):
    make_bad_folder(tmp_path)
    source = FolderSource(str(tmp_path), 16)
    source[1]
    copy = pickle.loads(pickle.dumps(source))
    assert copy.skipped.count == 0 and len(copy) == 6
    np.testing.assert_array_equal(copy[1]["image"], source[1]["image"])


# -- filters --------------------------------------------------------------------------------

def test_filters_and_counts(tmp_path):
    save(tmp_path / "a_small.png", size=(8, 12))
    save(tmp_path / "b_long.png", size=(64, 16))  # aspect 4
    save(tmp_path / "c_ok.png", size=(32, 32), color=GREEN)
    save(tmp_path / "d_ok.jpg", size=(40, 30), color=BLUE, fmt="JPEG")
    write(str(tmp_path / "e_bad.png"), b"not a png")  # header unreadable: kept

    plain = FolderSource(str(tmp_path), 16)
    assert len(plain) == 5 and plain.filter_counts == {"min_size": 0, "max_aspect": 0}

    by_size = FolderSource(str(tmp_path), 16, min_size=16)
    assert len(by_size) == 4 and by_size.filter_counts == {"min_size": 1, "max_aspect": 0}
    by_aspect = FolderSource(str(tmp_path), 16, max_aspect=2.0)
    assert len(by_aspect) == 4 and by_aspect.filter_counts == {"min_size": 0, "max_aspect": 1}
    both = FolderSource(str(tmp_path), 16, min_size=16, max_aspect=2.0)
    assert both.filter_counts == {"min_size": 1, "max_aspect": 1}
    assert [os.path.basename(p) for p in both.paths] == ["c_ok.png", "d_ok.jpg", "e_bad.png"]
    assert_close(mean_color(both[2]), GREEN)  # the unreadable one is skipped when read
    assert both.skipped.count == 1
    line = both.describe()
    assert "min_size dropped 1" in line and "max_aspect dropped 1" in line and "\n" not in line

    os.remove(tmp_path / "e_bad.png")  # an unreadable header keeps a file, so drop it here
    with pytest.raises(ConfigError, match="pass the filters") as e:
        FolderSource(str(tmp_path), 16, min_size=1000)
    assert "min_size=1000 dropped 4" in str(e.value)
    with pytest.raises(ConfigError, match="max_aspect=0.5"):
        FolderSource(str(tmp_path), 16, max_aspect=0.5)


# -- errors and description -----------------------------------------------------------------

def test_one_line_errors(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as e:
        FolderSource(missing, 16)
    assert missing in str(e.value) and "does not exist" in str(e.value)
    assert "\n" not in str(e.value)
    write(str(tmp_path / "only_text" / "a.txt"), "words")
    with pytest.raises(ConfigError) as e:
        FolderSource(str(tmp_path / "only_text"), 16)
    assert "only_text" in str(e.value) and ".png" in str(e.value)
    assert "\n" not in str(e.value)


def test_describe(tmp_path):
    save(tmp_path / "cats" / "a.png")
    save(tmp_path / "dogs" / "b.png")
    save(tmp_path / "dogs" / "c.png")
    line = FolderSource(str(tmp_path), 16, split="validation", num_val=1).describe()
    assert line == f"image folder {str(tmp_path)!r} (classes): 1 validation images of 3; 2 classes"
