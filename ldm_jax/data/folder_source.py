"""A folder of image files as a random-access training source (`config.data.name = "folder"`).

The layout is read from the folder, in this order:

1. manifest: `manifest=` names a .csv (header row) or .jsonl file with a `path` column (or
   `file_name` / `image`), an optional `caption` (or `text`) column and an optional integer
   `label` column. Paths are relative to the manifest's folder (absolute ones are kept); a
   relative manifest is looked up under `path` first. Rows keep the manifest's order (the
   same image may appear on several rows, e.g. one per caption). A row naming a missing file,
   or a label that is not a non-negative integer, is an error at construction.
   Records: {"image"} plus "caption" and "label" when the manifest has those columns.
2. captions: some image under `path` has a caption file next to it with the same name and a
   .txt extension (cat.jpg + cat.txt). Records: {"image", "caption"}; the text is stripped, and
   an image without a .txt gets "" and is counted in `missing_captions` (of the split). This
   wins over class sub-folders: captioned images in class folders get no labels.
3. classes: no image lies directly in `path` and at least two of its sub-folders hold images
   (at any depth). Records: {"image", "label"}, label = index of the sub-folder's name in the
   sorted list of those sub-folders (`class_names`). A single sub-folder is not a class
   layout: it is read as plain images.
4. images: anything else. Records: {"image"}.

Image files are .png, .jpg, .jpeg and .webp in any letter case, found at any depth; names
starting with "." (hidden files, macOS "._" copies, .ipynb_checkpoints) are ignored. Files are
ordered by their path relative to `path`, so the order is the same on every filesystem.

Splits: "validation" is the last `num_val` files of that order and "train" the rest. With
num_val=0 there is no held-out set and both splits are the whole set.

Filters (`min_size`, `max_aspect`) read only image headers, and only when set; they drop files
from the chosen split after it is cut, so a filter never moves a file between splits. A file
whose header cannot be read is kept and skipped when read.

Each record's image is uint8 (H, W, 3) with the shorter side `image_size` and the aspect ratio
kept; the input pipeline crops it square. A file that cannot be read (corrupt, truncated,
zero bytes, not an image, deleted since) is counted in `skipped` and the record of the next
index is returned instead, so every slot of every batch stays deterministic.
"""
from __future__ import annotations

import csv
import json
import os

from PIL import Image

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import image_files

_SPLITS = ("train", "validation")
_PATH_KEYS = ("path", "file_name", "image")
_CAPTION_KEYS = ("caption", "text")
_EXTENSIONS = ", ".join(image_files.IMAGE_EXTENSIONS)


def _is_image(name: str) -> bool:
    return name.lower().endswith(image_files.IMAGE_EXTENSIONS)


def _walk(root: str):
    """(relative posix path, absolute path) of every non-hidden file under root, sorted by
    relative path. Symlinked folders are followed once (a link loop is not re-entered)."""
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_folder = os.path.relpath(folder, root)
        for name in files:
            if name.startswith("."):
                continue
            rel = name if rel_folder == "." else os.path.join(rel_folder, name)
            found.append((rel.replace(os.sep, "/"), os.path.join(folder, name)))
    found.sort()
    return found


def _first_key(keys, candidates):
    return next((k for k in candidates if k in keys), None)


def _manifest_rows(manifest: str):
    """(line number, row dict) of a .csv (header row) or .jsonl manifest."""
    if manifest.lower().endswith(".jsonl"):
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"manifest {manifest!r} line {n} is not JSON ({e.msg}); "
                                      "write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"manifest {manifest!r} line {n} is not a JSON object; "
                                      'write e.g. {"path": "a.jpg", "caption": "a cat"}')
                yield n, row
    elif manifest.lower().endswith(".csv"):
        with open(manifest, encoding="utf-8-sig", newline="") as f:  # Excel writes a BOM
            reader = csv.DictReader(f)
            for row in reader:
                yield reader.line_num, row
    else:
        raise ConfigError(f"manifest {manifest!r} is neither .csv nor .jsonl (data.manifest); "
                          "write a .csv with a header row or a .jsonl file")


class FolderSource:
    """Image files under `path` (or listed in `manifest`): see the module docstring."""

    def __init__(self, path: str, image_size: int, split: str = "train", num_val: int = 0,
                 manifest: str = "", min_size: int = 0, max_aspect: float = 0.0):
        if split not in _SPLITS:
            raise ValueError(f"split {split!r} is not one of {list(_SPLITS)}")
        if image_size < 1:
            raise ConfigError(f"image_size={image_size} must be at least 1 (data.image_size)")
        if num_val < 0:
            raise ConfigError(f"data.num_val={num_val} is negative; set the number of "
                              "held-out images, or 0 for none")
        if min_size < 0:
            raise ConfigError(f"data.min_size={min_size} is negative; set 0 for no filter")
        if max_aspect and not max_aspect >= 1.0:  # long/short is never below 1; catches NaN
            raise ConfigError(f"data.max_aspect={max_aspect} drops every image; set a ratio "
                              "of 1 or more (e.g. 2.0), or 0 for no filter")
        self.path, self.image_size, self.split = path, image_size, split
        self.class_names: list[str] = []
        self.num_classes = 0
        self.missing_captions = 0
        self.has_captions = False
        self.skipped = image_files.SkipCounter()
        self.filter_counts = {"min_size": 0, "max_aspect": 0}

        # Each entry: (image file, caption file or caption text or None, label or None)
        if manifest:
            entries = self._from_manifest(path, manifest)
        else:
            entries = self._from_folder(path)
        self.total = len(entries)

        if num_val >= len(entries):
            raise ConfigError(f"data.num_val={num_val} holds out all {len(entries)} images of "
                              f"{self._where()}; set data.num_val below {len(entries)}")
        if num_val:
            entries = entries[-num_val:] if split == "validation" else entries[:-num_val]
        if min_size or max_aspect:
            entries = self._filter(entries, min_size, max_aspect)
        if not entries:
            raise ConfigError(f"no {split} images of {self._where()} pass the filters "
                              f"(data.min_size={min_size} dropped {self.filter_counts['min_size']}"
                              f", data.max_aspect={max_aspect} dropped "
                              f"{self.filter_counts['max_aspect']}); relax them")
        self._entries = entries
        if self.layout == "captions":  # of this split, after the filters
            self.missing_captions = sum(1 for e in entries if not e[1])
        self.paths = [e[0] for e in entries]

    def _where(self) -> str:
        return f"manifest {self.manifest!r}" if self.layout == "manifest" else \
            f"image folder {self.path!r}"

    def _from_folder(self, path: str):
        self.manifest = ""
        if not path or not os.path.isdir(path):
            raise ConfigError(f"image folder {path!r} does not exist (data.path); set "
                              "data.path to a folder of image files")
        files = _walk(path)
        images = [(rel, full) for rel, full in files if _is_image(rel)]
        if not images:
            raise ConfigError(f"image folder {path!r} has no {_EXTENSIONS} files (data.path); "
                              "put images in it (sub-folders per class are allowed)")
        # Caption files by their image-less name, e.g. "sub/cat" -> ".../sub/cat.txt".
        texts = {rel[:-4]: full for rel, full in files if rel.lower().endswith(".txt")}
        stem = lambda rel: os.path.splitext(rel)[0]  # noqa: E731
        if any(stem(rel) in texts for rel, _ in images):
            self.layout, self.has_captions = "captions", True
            entries = [(full, texts.get(stem(rel), ""), None) for rel, full in images]
            return entries
        top = sorted({rel.split("/", 1)[0] for rel, _ in images if "/" in rel})
        if len(top) >= 2 and all("/" in rel for rel, _ in images):
            self.layout, self.class_names = "classes", top
            self.num_classes = len(top)
            index = {name: i for i, name in enumerate(top)}
            return [(full, None, index[rel.split("/", 1)[0]]) for rel, full in images]
        self.layout = "images"
        return [(full, None, None) for _, full in images]

    def _from_manifest(self, path: str, manifest: str):
        self.layout = "manifest"
        if path and not os.path.isabs(manifest) and os.path.isfile(os.path.join(path, manifest)):
            manifest = os.path.join(path, manifest)
        self.manifest = manifest
        if not os.path.isfile(manifest):
            raise ConfigError(f"manifest {manifest!r} does not exist (data.manifest); set it to "
                              "a .csv or .jsonl file listing image paths")
        base = os.path.dirname(os.path.abspath(manifest))
        rows = list(_manifest_rows(manifest))
        if not rows:
            raise ConfigError(f"manifest {manifest!r} lists no images; add one row per image")
        keys = set().union(*(row.keys() for _, row in rows))
        path_key = _first_key(keys, _PATH_KEYS)
        if path_key is None:
            raise ConfigError(f"manifest {manifest!r} has no path column (one of "
                              f"{list(_PATH_KEYS)}); it has {sorted(k for k in keys if k)}")
        caption_key = _first_key(keys, _CAPTION_KEYS)
        has_label = "label" in keys
        self.has_captions = caption_key is not None
        entries = []
        for n, row in rows:
            name = row.get(path_key) or ""
            where = f"manifest {manifest!r} line {n}"
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"{where} has no {path_key!r}; give every row an image path")
            full = os.path.join(base, name.strip())
            if not os.path.isfile(full):
                raise ConfigError(f"{where} names {name!r}, which is not a file at {full!r}; "
                                  "fix the path (relative to the manifest's folder) or drop "
                                  "the row")
            caption = None
            if caption_key:
                caption = str(row.get(caption_key) or "").strip()
            label = None
            if has_label:
                label = self._label(row.get("label"), where)
            entries.append((full, caption, label))
        if has_label:
            self.num_classes = max(e[2] for e in entries) + 1
        return entries

    @staticmethod
    def _label(value, where: str) -> int:
        # CSV cells are strings; JSON may give ints (bools are ints to Python, but not labels).
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{where} has label {value!r}; labels must be integers 0, 1, ... "
                              "on every row")
        return value

    def _filter(self, entries, min_size: int, max_aspect: float):
        kept = []
        for entry in entries:
            try:
                with Image.open(entry[0]) as image:
                    w, h = image.size
            except Exception:  # noqa: BLE001 - unreadable: kept, and skipped when read
                kept.append(entry)
                continue
            short, long = min(w, h), max(w, h)
            if min_size and short < min_size:
                self.filter_counts["min_size"] += 1
            elif max_aspect and (short == 0 or long / short > max_aspect):
                self.filter_counts["max_aspect"] += 1
            else:
                kept.append(entry)
        return kept

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index):
        n = len(self._entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for step in range(n):
            full, caption, label = self._entries[(index + step) % n]
            try:
                record = self._read(full, caption, label)
            except (image_files.BadImage, OSError) as e:
                self.skipped.add(str(e) if isinstance(e, image_files.BadImage)
                                 else f"{full}: {type(e).__name__}: {e.strerror or e}")
                continue
            return record
        raise ConfigError(f"none of the {n} {self.split} images of {self._where()} can be read "
                          f"(last: {self.skipped.last}); check the files")

    def _read(self, full: str, caption, label) -> dict:
        with open(full, "rb") as f:
            data = f.read()
        image = image_files.decode(data, full)
        record = {"image": image_files.resize_shorter_side(image, self.image_size)}
        if self.layout == "captions":
            # Caption files are read here, not at construction, so big folders open fast.
            if caption:
                with open(caption, encoding="utf-8", errors="replace") as f:
                    caption = f.read()
            record["caption"] = caption.strip()
        elif caption is not None:
            record["caption"] = caption
        if label is not None:
            record["label"] = label
        return record

    def __getstate__(self):
        # The skip counter holds a lock; a copy in another process counts its own skips.
        state = dict(self.__dict__)
        state["skipped"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.skipped = image_files.SkipCounter()

    def describe(self) -> str:
        parts = [f"{self._where()} ({self.layout}): {len(self)} {self.split} images of "
                 f"{self.total}"]
        if self.class_names:
            parts.append(f"{self.num_classes} classes")
        elif self.num_classes:
            parts.append(f"labels 0..{self.num_classes - 1}")
        if self.has_captions:
            parts.append("captions" + (f" ({self.missing_captions} images without)"
                                       if self.missing_captions else ""))
        dropped = [f"{k} dropped {v}" for k, v in self.filter_counts.items() if v]
        if dropped:
            parts.append(", ".join(dropped))
        if self.skipped.count:
            parts.append(f"{self.skipped.count} unreadable reads substituted")
        return "; ".join(parts)
