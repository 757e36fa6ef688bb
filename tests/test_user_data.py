"""User data through the training input pipeline: a folder of class sub-folders and tar shards
feed the same sharded, resumable stream as the embedded dataset. Two process indices see
disjoint halves of every global batch; a resumed iterator continues with the next unseen
examples; random crops depend on the stream position only; unreadable files are skipped and
counted while training goes on; a class-conditional DDPM trains on a class folder and
sample.py --class=NAME draws from it."""
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config
from ldm_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("cat", "dog", "fox")


def _picture(seed: int, size=(24, 20)) -> Image.Image:
    """A distinct picture per seed (its mean colour encodes the seed)."""
    rng = np.random.default_rng(seed)
    base = np.array([seed * 7 % 256, seed * 13 % 256, seed * 29 % 256], np.float32)
    pixels = np.clip(base + rng.normal(0, 3, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pets")
    n = 0
    for c, name in enumerate(CLASSES):
        os.makedirs(root / name)
        for i in range(8):
            ext = ("png", "jpg", "webp")[i % 3]
            _picture(n).save(root / name / f"{i:02d}.{ext}")
            n += 1
    return str(root)


@pytest.fixture(scope="module")
def damaged_folder(class_folder, tmp_path_factory):
    """The class folder plus a fake JPEG and an empty PNG."""
    import shutil
    root = tmp_path_factory.mktemp("damaged") / "pets"
    shutil.copytree(class_folder, root)
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "fox" / "empty.png").write_bytes(b"")
    return str(root)


def _data_config(path, **fields):
    config = tiny_config("", **{"data.name": "folder", "data.path": path,
                                "data.image_size": 16, **fields})
    return config


def _identity(batch) -> list:
    """Each image of a batch by its rounded mean colour (pictures differ in it)."""
    return [tuple(np.round(img.mean(axis=(0, 1)), 1)) for img in batch["image"]]


def _iterator(config, source, process_index=0, process_count=1, batch=8):
    return pipeline.make_train_iterator(source, config.data, batch, config.seed, process_index,
                                        process_count, label_keys=("label",))


def test_two_processes_split_every_global_batch(class_folder):
    config = _data_config(class_folder)
    source = pipeline.load_source(config.data, square=False)
    assert len(source) == 24 and list(source.class_names) == list(CLASSES)
    whole = _iterator(config, source)
    halves = [_iterator(config, source, p, 2) for p in range(2)]
    seen = []
    for _ in range(3):  # the whole epoch of 24 files
        full = next(whole)
        parts = [next(h) for h in halves]
        joined = {k: np.concatenate([p[k] for p in parts]) for k in full}
        for k in full:
            np.testing.assert_array_equal(joined[k], full[k])
        a, b = _identity(parts[0]), _identity(parts[1])
        assert not set(a) & set(b)
        seen += a + b
    assert len(set(seen)) == len(seen) == 24  # no file twice within the epoch


def test_resumed_iterator_continues_with_the_next_examples(class_folder):
    config = _data_config(class_folder, **{"data.crop": "random"})
    source = pipeline.load_source(config.data, square=False)
    straight = _iterator(config, source)
    expected = [next(straight) for _ in range(5)]
    first = _iterator(config, source)
    for _ in range(2):
        next(first)
    state = first.get_state()
    resumed = _iterator(config, source)
    resumed.set_state(state)
    for want in expected[2:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_random_crops_follow_the_stream_position(tmp_path):
    os.makedirs(tmp_path / "wide")
    _picture(1, size=(64, 16)).save(tmp_path / "wide" / "a.png")  # 4:1, cropped to 16x16
    config = _data_config(str(tmp_path / "wide"), **{"data.crop": "random",
                                                     "data.random_flip": False})
    source = pipeline.load_source(config.data, square=False)
    assert np.asarray(source[0]["image"]).shape == (16, 64, 3)
    batch = next(pipeline.make_train_iterator(source, config.data, 8, 0))["image"]
    assert batch.shape == (8, 16, 16, 3)
    offsets = {img.tobytes() for img in batch}
    assert len(offsets) > 1  # different crops of the one picture
    again = next(pipeline.make_train_iterator(source, config.data, 8, 0))["image"]
    np.testing.assert_array_equal(batch, again)
    center = pipeline.load_source(config.data)[0]["image"]  # what grids and evaluation read
    np.testing.assert_array_equal(center, np.asarray(source[0]["image"])[:, 24:40])


def test_unreadable_files_are_counted_and_training_goes_on(damaged_folder, tmp_path, capsys):
    from ldm_jax.training.loop import train
    config = _data_config(damaged_folder, **{"model.label_keys": ("label",),
                                           "training.num_steps": 4, "training.log_every": 2,
                                           "training.batch_size": 16})
    history = train(config, str(tmp_path / "run"))
    assert [h["step"] for h in history] == [2, 4]
    out = capsys.readouterr().out
    assert "data: " in out and "26 train images of 26; 3 classes" in out
    assert "unreadable image file(s) so far" in out
    from ldm_jax import config_utils
    saved = config_utils.load_config(str(tmp_path / "run"))
    assert list(saved.data.class_names) == list(CLASSES)


def test_class_folder_ddpm_samples_a_named_class(class_folder, tmp_path):
    from ldm_jax.training.loop import train
    workdir = str(tmp_path / "run")
    config = _data_config(class_folder, **{"model.label_keys": ("label",),
                                           "training.num_steps": 2,
                                           "sampling.guidance_scale": 2.0})
    train(config, workdir)
    os.rename(class_folder, class_folder + "_moved")  # sampling needs only the workdir
    try:
        out = str(tmp_path / "foxes.png")
        r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"),
                            f"--workdir={workdir}", "--class=fox", "--class=1", "--num=2",
                            "--steps=2", f"--out={out}"], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    finally:
        os.rename(class_folder + "_moved", class_folder)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out[:-4] + ".txt") as f:  # "row, column: caption" per image
        assert [line.split(": ")[1] for line in f.read().splitlines()] == ["fox", "dog"]


def _tar_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for name, data in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_tar_shards_feed_captions(tmp_path):
    def jpeg(seed):
        buf = io.BytesIO()
        _picture(seed).save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    _tar_shard(tmp_path / "000000.tar", [(f"{i:06d}", jpeg(i), f"picture {i}") for i in range(6)])
    _tar_shard(tmp_path / "000001.tar", [(f"{i:06d}", jpeg(i), f"picture {i}")
                                         for i in range(6, 12)])
    config = tiny_config("", **{"data.name": "webdataset", "data.image_size": 16,
                                "data.path": str(tmp_path / "{000000..000001}.tar")})
    source = pipeline.load_source(config.data, square=False)
    assert len(source) == 12 and pipeline.has_captions(config.data, source)
    it = pipeline.make_train_iterator(source, config.data, 4, 0,
                                      record_fields=lambda r: {"n": int(r["caption"].split()[1])})
    numbers = np.concatenate([next(it)["n"] for _ in range(3)])
    assert sorted(numbers) == list(range(12))


def test_resuming_on_changed_class_folders_is_refused(class_folder, tmp_path):
    import shutil

    from ldm_jax.config_checks import ConfigError
    from ldm_jax.training.loop import train
    folder = str(tmp_path / "pets")
    shutil.copytree(class_folder, folder)
    workdir = str(tmp_path / "run")
    fields = {"model.label_keys": ("label",), "training.num_steps": 2}
    train(_data_config(folder, **fields), workdir)
    train(_data_config(folder, **{**fields, "training.num_steps": 3}), workdir)  # same classes
    os.makedirs(os.path.join(folder, "ant"))
    _picture(99).save(os.path.join(folder, "ant", "a.png"))
    with pytest.raises(ConfigError, match=r"class folders .* changed since this run started "
                                          r"\(classes \['cat', 'dog', 'fox'\], now \['ant'"):
        train(_data_config(folder, **{**fields, "training.num_steps": 4}), workdir)
