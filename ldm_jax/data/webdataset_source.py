"""LAION-style WebDataset tar shards as a random-access training source, read with `tarfile`
(no TensorFlow, no webdataset package).

A shard holds samples as consecutive members sharing a key: "000123.jpg", "000123.txt",
"000123.json" (the key is the member name up to the first '.' of its base name, as webdataset
groups them). Construction indexes every shard once (member data offsets and sizes, captions,
json filters; nothing is extracted); `source[i]` then seeks straight to sample i's image.

Each record is {"image": uint8 (H, W, 3) with min(H, W) == image_size, "caption": str,
"key": str}; the square crop happens in the input pipeline. An image that fails to decode is
counted in `skipped` and replaced by the next index's record, so a bad member never changes
which examples the other slots of a batch hold.
"""
from __future__ import annotations

import json
import operator
import os
import re
import tarfile
import threading
import weakref

import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import image_files

_IMAGE_EXTS = tuple(e.lstrip(".") for e in image_files.IMAGE_EXTENSIONS)
_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt,
        "<": operator.lt}
# Two-character operators first, so "a>=5" is not read as "a" > "=5".
_FILTER = re.compile(r"^\s*([^<>=\s]+)\s*(>=|<=|==|>|<)\s*(.+?)\s*$")


# ----------------------------------------------------------------------------- shard lists

def _split_top_level(text: str) -> list[str]:
    """`text` split on the commas that are not inside braces."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _brace_expand(pattern: str) -> list[str]:
    """Shell-style expansion of the first {..} group (then recursively the rest):
    "{000..002}" -> zero-padded numbers, "{a,b}" -> alternatives."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ConfigError(f"data.path {pattern!r} has an unclosed '{{'")
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        # As bash: a leading zero on either end ("000", not "0") pads to the longer width.
        padded = any(len(n) > 1 and n[0] == "0" for n in (first, last))
        width = max(len(first), len(last)) if padded else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        options = _split_top_level(body)
    return [expanded for option in options for expanded in _brace_expand(head + option + tail)]


def expand_shards(spec) -> list[str]:
    """A list of shard paths, or one string of comma-separated paths and/or brace patterns
    ("data/{000000..000009}.tar", "{a,b}.tar"), -> the shard paths in order (user dirs
    expanded). Raises ConfigError for an empty list or a missing shard."""
    items = [spec] if isinstance(spec, str) else list(spec)
    shards = []
    for item in items:
        for part in _split_top_level(str(item)):
            if part.strip():
                shards += [os.path.expanduser(p.strip()) for p in _brace_expand(part.strip())]
    if not shards:
        raise ConfigError(f"data.path={spec!r} names no shards; set it to tar files, e.g. "
                          "'laion/{000000..000099}.tar'")
    for path in shards:
        if not os.path.isfile(path):
            raise ConfigError(f"webdataset shard {path!r} does not exist (data.path={spec!r})")
    return shards


# ----------------------------------------------------------------------------- json filters

class _Filter:
    """One "field op value" test on a sample's json metadata."""

    def __init__(self, text: str):
        match = _FILTER.match(text)
        if not match:
            raise ConfigError(f"data.filters entry {text!r} is not 'field op value' with op one "
                              f"of {list(_OPS)} (e.g. 'aesthetic_score>=5')")
        self.text = text.strip()
        self.field, op, value = match.groups()
        self.op = _OPS[op]
        try:
            self.value = float(value)
        except ValueError:
            if op != "==":
                raise ConfigError(f"data.filters entry {text!r}: {op} needs a number") from None
            self.value = value.strip("'\"")

    def keeps(self, meta) -> bool:
        """Whether a sample with json `meta` (None when unreadable) passes; a sample lacking
        the field, or with a value of the wrong type, fails."""
        if not isinstance(meta, dict) or meta.get(self.field) is None:
            return False
        found = meta[self.field]
        if isinstance(self.value, float):
            if isinstance(found, bool) or not isinstance(found, (int, float)):
                try:  # numbers written as strings, e.g. "512"
                    found = float(found)
                except (TypeError, ValueError):
                    return False
            return bool(self.op(float(found), self.value))
        return str(found) == self.value


def parse_filters(filters: str) -> list[_Filter]:
    return [_Filter(part) for part in filters.split(",") if part.strip()] if filters else []


# ----------------------------------------------------------------------------- the source

def _split_name(name: str):
    """Member name -> (key, extension), or None for a name without an extension."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no extension, or a name starting with '.' (as webdataset skips them)
        return None
    return name[:dot], name[dot + 1:].lower()


class _Handle:
    """A thread's open shard file, closed when the thread ends and its locals go."""

    def __init__(self, shard_id: int, path: str):
        self.shard_id, self.file = shard_id, open(path, "rb")

    def close(self) -> None:
        if hasattr(self, "file"):  # not when open() failed
            self.file.close()

    __del__ = close


class WebDatasetSource:
    """Random access to the image samples of WebDataset tar shards.

    Attributes: `shards` (paths), `image_size`, `caption_key`, `filters` (their texts),
    `filter_counts` ({"no_image": n, filter text: n} samples dropped at indexing, each counted
    once under the first reason), `missing_captions` (kept samples with neither .txt nor a
    json caption), `skipped` (image_files.SkipCounter of undecodable images substituted),
    `has_captions` (True).
    """

    has_captions = True

    def __init__(self, shards, image_size: int, caption_key: str = "caption",
                 filters: str = ""):
        self.shards = expand_shards(shards)
        self.image_size = int(image_size)
        self.caption_key = caption_key
        parsed = parse_filters(filters)
        self.filters = [f.text for f in parsed]
        self.filter_counts = {"no_image": 0, **{f.text: 0 for f in parsed}}
        self.missing_captions = 0
        self.skipped = image_files.SkipCounter()
        self._local = threading.local()
        self._handles = weakref.WeakSet()

        shard_ids, offsets, sizes, self._keys, self._captions = [], [], [], [], []
        for shard_id, path in enumerate(self.shards):
            for key, offset, size, caption in self._index_shard(path, parsed):
                shard_ids.append(shard_id)
                offsets.append(offset)
                sizes.append(size)
                self._keys.append(key)
                self._captions.append(caption)
        # Compact arrays: a LAION subset can hold millions of samples.
        self._shard_ids = np.asarray(shard_ids, np.int32)
        self._offsets = np.asarray(offsets, np.int64)
        self._sizes = np.asarray(sizes, np.int64)
        if not self._keys:
            dropped = sum(self.filter_counts.values())
            reasons = ", ".join(f"{k}: {v}" for k, v in self.filter_counts.items() if v)
            raise ConfigError(f"no usable samples in {len(self.shards)} shards (all {dropped} "
                              f"dropped: {reasons or 'no samples'}); check data.path and "
                              "data.filters")

    # -- indexing

    def _index_shard(self, path: str, filters: list[_Filter]):
        """(key, image data offset, image size, caption) of the samples of one shard that have
        an image and pass the filters, in tar order."""
        try:
            tar = tarfile.open(path, "r:")  # uncompressed only: offsets must be file offsets
        except (tarfile.TarError, OSError) as e:
            raise ConfigError(f"webdataset shard {path!r} is not a readable uncompressed tar "
                              f"({type(e).__name__}: {e})") from None
        with tar:
            samples: dict[str, dict[str, tarfile.TarInfo]] = {}
            for member in tar:
                split = _split_name(member.name) if member.isfile() else None
                if split:
                    # First member wins for a repeated extension, as readers see it first.
                    samples.setdefault(split[0], {}).setdefault(split[1], member)
            for key, members in samples.items():
                image = next((m for ext, m in members.items() if ext in _IMAGE_EXTS), None)
                if image is None:
                    self.filter_counts["no_image"] += 1
                    continue
                meta = None
                if "json" in members and (filters or "txt" not in members):
                    meta = self._read_json(tar, members["json"])
                failed = next((f for f in filters if not f.keeps(meta)), None)
                if failed is not None:
                    self.filter_counts[failed.text] += 1
                    continue
                caption = self._caption(tar, members, meta)
                if not caption:
                    self.missing_captions += 1
                yield key, image.offset_data, image.size, caption

    @staticmethod
    def _read_json(tar, member):
        try:
            return json.loads(tar.extractfile(member).read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return None

    def _caption(self, tar, members, meta) -> str:
        if "txt" in members:
            return tar.extractfile(members["txt"]).read().decode("utf-8", "replace").strip()
        value = meta.get(self.caption_key) if isinstance(meta, dict) else None
        return "" if value is None else str(value).strip()

    # -- random access

    def __len__(self) -> int:
        return len(self._keys)

    def _read(self, index: int) -> bytes:
        """The image bytes of sample `index`, through this thread's open shard (grain reads
        from several threads; each keeps its own handle and file position)."""
        shard_id = int(self._shard_ids[index])
        handle = getattr(self._local, "handle", None)
        if handle is None or handle.shard_id != shard_id:
            if handle is not None:
                handle.close()
            handle = self._local.handle = _Handle(shard_id, self.shards[shard_id])
            self._handles.add(handle)
        handle.file.seek(int(self._offsets[index]))
        return handle.file.read(int(self._sizes[index]))

    def close(self) -> None:
        """Closes the open shard files of every thread (reading again reopens them)."""
        for handle in list(self._handles):
            handle.close()
        self._local = threading.local()

    def _record(self, index: int) -> dict:
        name = f"{self.shards[self._shard_ids[index]]}:{self._keys[index]}"
        image = image_files.decode(self._read(index), name)
        return {"image": image_files.resize_shorter_side(image, self.image_size),
                "caption": self._captions[index], "key": self._keys[index]}

    def __getitem__(self, index):
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for step in range(n):
            try:
                return self._record((index + step) % n)
            except image_files.BadImage as e:
                self.skipped.add(str(e))
        raise ConfigError(f"none of the {n} images in {len(self.shards)} webdataset shards "
                          f"decodes (last: {self.skipped.last})")

    # -- pickling (grain may copy the source into worker processes)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"], state["_handles"]  # open files stay with their process
        state["skipped"] = (self.skipped.count, self.skipped.last)
        return state

    def __setstate__(self, state):
        count, last = state.pop("skipped")
        self.__dict__.update(state)
        self.skipped = image_files.SkipCounter()
        self.skipped.count, self.skipped.last = count, last
        self._local = threading.local()
        self._handles = weakref.WeakSet()

    def describe(self) -> str:
        dropped = ", ".join(f"{k}: {v}" for k, v in self.filter_counts.items() if v) or "none"
        return (f"webdataset: {len(self.shards)} shards, {len(self)} samples "
                f"(dropped {dropped}), {self.missing_captions} missing captions")
