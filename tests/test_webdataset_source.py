"""WebDatasetSource on two small LAION-style tar shards written with tarfile."""
import io
import json
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config_checks import ConfigError
from ldm_jax.data.webdataset_source import WebDatasetSource, _brace_expand, expand_shards

SIZE = 16


def _image(mode, size, color, fmt):
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _meta(aesthetic, pwatermark, width, **extra):
    return json.dumps({"aesthetic_score": aesthetic, "pwatermark": pwatermark,
                       "original_width": width, **extra}).encode()


# key -> members, as img2dataset writes them (image, caption text, metadata json).
SHARD0 = {
    "000000": {"jpg": _image("RGB", (40, 30), (255, 0, 0), "JPEG"), "txt": b"  a red box\n",
               "json": _meta(6.0, 0.1, 640, caption="the txt wins")},
    "000001": {"png": _image("RGB", (24, 48), (0, 255, 0), "PNG"), "txt": b"a green bar",
               "json": _meta(4.5, 0.2, 512)},
    "000002": {"jpg": _image("L", (50, 50), 128, "JPEG"),
               "json": _meta(7.0, 0.9, 300, caption="grey, from json")},
    "000003": {"txt": b"no image here", "json": _meta(9.0, 0.0, 1024)},
    "000004": {"jpg": b"\xff\xd8\xff this is not a jpeg", "txt": b"broken",
               "json": _meta(8.0, 0.0, 1024)},
}
SHARD1 = {
    "000005": {"webp": _image("RGB", (64, 32), (0, 0, 255), "WEBP"), "txt": b"a blue webp",
               "json": _meta(5.5, 0.3, 800)},
    "000006": {"jpg": b"", "txt": b"empty", "json": _meta(5.0, 0.5, 256)},
    "000007": {"jpg": _image("RGB", (20, 20), (255, 255, 0), "JPEG")},
    "000008": {"jpg": _image("RGB", (16, 16), (0, 255, 255), "JPEG"), "txt": b"cyan",
               "json": b"{not json"},
    "part/000009": {"jpg": _image("RGB", (30, 16), (255, 0, 255), "JPEG"),
                    "txt": b"in a folder", "json": _meta(9.0, 0.05, 2048)},
}


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.fixture
def shards(tmp_path):
    return [_write_shard(tmp_path / "000000.tar", SHARD0),
            _write_shard(tmp_path / "000001.tar", SHARD1)]


def _same(a, b):
    return (a["key"], a["caption"]) == (b["key"], b["caption"]) and \
        np.array_equal(a["image"], b["image"])


def test_index_captions_and_counts(shards):
    source = WebDatasetSource(shards, SIZE)
    assert len(source) == 9
    assert source._keys == ["000000", "000001", "000002", "000004", "000005", "000006",
                            "000007", "000008", "part/000009"]
    assert source._captions == ["a red box", "a green bar", "grey, from json", "broken",
                                "a blue webp", "empty", "", "cyan", "in a folder"]
    assert source.filter_counts == {"no_image": 1}
    assert source.missing_captions == 1
    assert source.has_captions
    assert source.describe() == ("webdataset: 2 shards, 9 samples (dropped no_image: 1), "
                                 "1 missing captions")


def test_images_decode_and_keep_aspect(shards):
    source = WebDatasetSource(shards, SIZE)
    expected = {  # index -> (key, (H, W), colour)
        0: ("000000", (16, 21), (255, 0, 0)),       # 40x30 jpg
        1: ("000001", (32, 16), (0, 255, 0)),       # 24x48 png
        2: ("000002", (16, 16), (128, 128, 128)),   # grayscale jpg made RGB
        4: ("000005", (16, 32), (0, 0, 255)),       # 64x32 webp
        6: ("000007", (16, 16), (255, 255, 0)),     # 20x20 jpg, shrunk
        7: ("000008", (16, 16), (0, 255, 255)),     # already 16x16
        8: ("part/000009", (16, 30), (255, 0, 255)),  # 30x16 jpg, enlarged
    }
    for index, (key, shape, colour) in expected.items():
        record = source[index]
        assert record["key"] == key
        assert record["image"].dtype == np.uint8
        assert record["image"].shape == shape + (3,)
        assert np.abs(record["image"].astype(int) - colour).max() <= 3, key
    assert source[0]["caption"] == "a red box"
    assert source[-1]["key"] == "part/000009"
    assert source.skipped.count == 0
    with pytest.raises(IndexError):
        source[9]


def test_bad_members_substitute_the_next_good_record(shards):
    source = WebDatasetSource(shards, SIZE)
    corrupt, empty = source[3], source[5]
    # The corrupt jpg (index 3) gives the next record, the zero-byte one (index 5) likewise.
    assert corrupt["key"] == "000005" and corrupt["caption"] == "a blue webp"
    assert _same(corrupt, source[4])
    assert empty["key"] == "000007" and _same(empty, source[6])
    assert source.skipped.count == 2
    assert "000006" in source.skipped.last and "empty" in source.skipped.last

    other = WebDatasetSource(shards, SIZE)
    assert all(_same(source[i], other[i]) for i in range(len(source)))


def test_substitution_wraps_and_all_bad_is_an_error(tmp_path):
    good = _image("RGB", (20, 20), (10, 20, 30), "PNG")
    path = _write_shard(tmp_path / "s.tar", {"a": {"png": good, "txt": b"good"},
                                             "b": {"jpg": b"junk", "txt": b"bad"}})
    source = WebDatasetSource(path, SIZE)
    assert source[1]["key"] == "a"  # the last bad sample wraps round to index 0
    assert source.skipped.count == 1

    bad = _write_shard(tmp_path / "bad.tar", {"a": {"jpg": b"junk"}, "b": {"png": b""}})
    with pytest.raises(ConfigError, match="none of the 2 images"):
        WebDatasetSource(bad, SIZE)[0]


def test_filters_and_counts(shards):
    filters = "aesthetic_score>=5, pwatermark<=0.5,original_width>=512"
    source = WebDatasetSource(shards, SIZE, filters=filters)
    assert source._keys == ["000000", "000004", "000005", "part/000009"]
    # Each dropped sample is counted once, under the first filter it fails; a missing or
    # unreadable json (000007, 000008) fails the first filter.
    assert source.filter_counts == {"no_image": 1, "aesthetic_score>=5": 3,
                                    "pwatermark<=0.5": 1, "original_width>=512": 1}
    assert source.missing_captions == 0
    assert source.describe() == (
        "webdataset: 2 shards, 4 samples (dropped no_image: 1, aesthetic_score>=5: 3, "
        "pwatermark<=0.5: 1, original_width>=512: 1), 0 missing captions")
    assert source[1]["key"] == "000005"  # the corrupt 000004 is replaced by the next kept one

    strict = WebDatasetSource(shards, SIZE, filters="aesthetic_score>5.5,original_width==2048")
    assert strict._keys == ["part/000009"]
    assert strict.filter_counts == {"no_image": 1, "aesthetic_score>5.5": 5,
                                    "original_width==2048": 3}
    assert WebDatasetSource(shards, SIZE, filters="pwatermark<0.1")._keys == [
        "000004", "part/000009"]


def test_caption_key_from_json(tmp_path):
    meta = json.dumps({"TEXT": "laion column name", "caption": "other"}).encode()
    path = _write_shard(tmp_path / "s.tar", {"k": {"jpg": _image("RGB", (16, 16), 0, "JPEG"),
                                                   "json": meta}})
    assert WebDatasetSource(path, SIZE, caption_key="TEXT")[0]["caption"] == "laion column name"
    missing = WebDatasetSource(path, SIZE, caption_key="nope")
    assert missing[0]["caption"] == "" and missing.missing_captions == 1


def test_bad_filter_text(shards):
    with pytest.raises(ConfigError, match="aesthetic_score~5"):
        WebDatasetSource(shards, SIZE, filters="aesthetic_score~5")
    with pytest.raises(ConfigError, match="needs a number"):
        WebDatasetSource(shards, SIZE, filters="aesthetic_score>=high")


def test_no_usable_samples(shards):
    with pytest.raises(ConfigError) as e:
        WebDatasetSource(shards, SIZE, filters="aesthetic_score>=100")
    assert str(e.value).startswith("no usable samples in 2 shards (all 10 dropped: "
                                   "no_image: 1, aesthetic_score>=100: 9)")


def test_shard_lists(shards, tmp_path):
    assert _brace_expand("d/{000008..000011}.tar") == [
        "d/000008.tar", "d/000009.tar", "d/000010.tar", "d/000011.tar"]
    assert _brace_expand("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert _brace_expand("x{0..10}")[-2:] == ["x9", "x10"]
    assert _brace_expand("{08..10}") == ["08", "09", "10"]
    assert _brace_expand("{3..1}") == ["3", "2", "1"]
    assert _brace_expand("{x,y{1..2}}.tar") == ["x.tar", "y1.tar", "y2.tar"]
    assert _brace_expand("plain.tar") == ["plain.tar"]

    assert expand_shards(f"{tmp_path}/{{000000..000001}}.tar") == shards
    assert expand_shards(f"{tmp_path}/000000.tar,{tmp_path}/{{000001}}.tar") == shards
    assert expand_shards(f" {shards[1]} , {shards[0]} ") == shards[::-1]
    assert expand_shards(f"{tmp_path}/{{000000,000001}}.tar") == shards

    reference = WebDatasetSource(shards, SIZE)
    braced = WebDatasetSource(f"{tmp_path}/{{000000..000001}}.tar", SIZE)
    listed = WebDatasetSource(",".join(shards), SIZE)
    assert braced._keys == listed._keys == reference._keys
    assert _same(braced[4], reference[4])
    reversed_ = WebDatasetSource(shards[::-1], SIZE)
    assert reversed_._keys[0] == "000005"  # shard order is the order given


def test_missing_and_unreadable_shards(shards, tmp_path):
    with pytest.raises(ConfigError, match="000002.tar"):
        WebDatasetSource(f"{tmp_path}/{{000000..000002}}.tar", SIZE)
    with pytest.raises(ConfigError, match="names no shards"):
        WebDatasetSource(" , ", SIZE)
    not_tar = tmp_path / "notes.tar"
    not_tar.write_bytes(b"hello" * 200)
    with pytest.raises(ConfigError, match="notes.tar"):
        WebDatasetSource([shards[0], str(not_tar)], SIZE)
    gz = tmp_path / "c.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        tar.add(shards[0], arcname="x.tar")
    with pytest.raises(ConfigError, match="uncompressed"):
        WebDatasetSource(str(gz), SIZE)


def test_threads_read_the_same_records(shards):
    source = WebDatasetSource(shards, SIZE)
    single = [source[i] for i in range(len(source))]
    order = np.random.default_rng(0).permutation(np.tile(np.arange(len(source)), 8))
    threaded = WebDatasetSource(shards, SIZE)
    with ThreadPoolExecutor(4) as pool:
        records = list(pool.map(threaded.__getitem__, order))
    assert all(_same(r, single[i]) for r, i in zip(records, order))
    assert threaded.skipped.count == 2 * 8  # two bad members, each read 8 times
    threaded.close()
    assert _same(threaded[0], single[0])  # reopens after close
    threaded.close()


def test_pickle_round_trip(shards):
    source = WebDatasetSource(shards, SIZE)
    _ = source[3]  # opens a handle and counts one skip
    copy = pickle.loads(pickle.dumps(source))
    assert copy.skipped.count == 1
    assert all(_same(source[i], copy[i]) for i in range(len(source)))
    source.close()
    copy.close()
