"""Caption adherence on the shapes dataset: does an image show what its labels ask for?

Images are read with `shapes_reader.read_scenes`; each reading is compared with the labels it was
meant to show (label dicts, examples, or captions) and scored per attribute, as the fraction of
images that get that attribute right.

Matching rule (per image). Objects are matched before their attributes are compared:
  1. a read object and a requested object in the same grid cell are a pair;
  2. the requested and read objects left over are paired in slot (reading) order, so an object
     drawn in the wrong cell still has its colour, shape and size judged;
  3. whatever is left is a missing object (requested, not read) or an extra one (read, not
     requested; a reading may find more than two objects).
Scores:
  background   the background matches;
  num_objects  as many objects read as requested;
  position     every requested object paired by cell in step 1, and nothing extra;
  color, shape, size
               every pair agrees on it, and no object is missing or extra (a missing or extra
               object counts as wrong for all its attributes);
  all          every attribute above is right.

Validation on rendered images (clean, with pixel noise, with noise and blur):
  python -m ldm_jax.evaluation.shapes_adherence --image_size=32 --num=2000 --split=test
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from ldm_jax.data import shapes
from ldm_jax.evaluation.shapes_reader import check_images, read_scenes

__all__ = ["ATTRIBUTES", "OBJECT_ATTRIBUTES", "image_scores", "adherence",
           "adherence_by_group", "corrupt", "main"]

OBJECT_ATTRIBUTES = ("color", "shape", "size")
ATTRIBUTES = ("background", "num_objects", *OBJECT_ATTRIBUTES, "position", "all")

# Default corruption for validation, in uint8 units: std 0.1 on the model's [-1, 1] scale.
DEFAULT_NOISE = 12.75
# Gaussian blur std in pixels of a 32 px image (scaled with the image size).
DEFAULT_BLUR = 0.5


def _as_labels(item) -> dict:
    if isinstance(item, str):
        return shapes.parse_caption(item)
    if not isinstance(item, Mapping):
        raise TypeError(f"expected a labels dict or a caption string, got {type(item).__name__}")
    missing = [k for k in shapes.LABEL_KEYS if k not in item]
    if missing:
        raise ValueError(f"labels lack keys {missing}; pass dicts with all of shapes.LABEL_KEYS")
    return {k: int(item[k]) for k in shapes.LABEL_KEYS}


def _objects(labels: dict) -> list[dict]:
    """The objects in the slots (position -1 = empty slot), in slot order."""
    return [{a: labels[f"{a}_{k}"] for a in (*OBJECT_ATTRIBUTES, "position")}
            for k in range(shapes.MAX_OBJECTS) if labels[f"position_{k}"] >= 0]


def image_scores(reading: dict, labels) -> dict[str, bool]:
    """Per attribute, whether `reading` (a `read_scene` dict) shows `labels` (see module doc)."""
    reading, labels = _as_labels(reading), _as_labels(labels)
    wanted, found = _objects(labels), _objects(reading)
    unpaired = {o["position"]: o for o in found}  # slot order kept
    pairs, left_wanted = [], []
    for w in wanted:
        f = unpaired.pop(w["position"], None)
        if f is None:
            left_wanted.append(w)
        else:
            pairs.append((w, f))
    paired_by_cell = len(pairs)
    pairs += list(zip(left_wanted, unpaired.values()))
    # Missing plus extra objects; objects beyond the reading's two slots are extra too.
    unmatched = len(wanted) + max(reading["num_objects"], len(found)) - 2 * len(pairs)
    scores = {
        "background": reading["background"] == labels["background"],
        "num_objects": reading["num_objects"] == labels["num_objects"],
        "position": paired_by_cell == len(wanted) and unmatched == 0,
    }
    for attr in OBJECT_ATTRIBUTES:
        scores[attr] = unmatched == 0 and all(w[attr] == f[attr] for w, f in pairs)
    scores["all"] = all(scores.values())
    return {a: bool(scores[a]) for a in ATTRIBUTES}


def _records(items) -> list:
    if isinstance(items, Mapping):  # dict of arrays, e.g. a batch
        n = len(np.asarray(items[shapes.LABEL_KEYS[0]]))
        return [{k: np.asarray(items[k])[i] for k in shapes.LABEL_KEYS} for i in range(n)]
    return list(items)


def adherence(readings, labels) -> dict[str, float]:
    """Fraction of images right per attribute (`ATTRIBUTES`), plus 'n', the image count.

    readings: `read_scenes` output (list of dicts, or a dict of arrays); labels: the same number
    of label dicts, examples or captions. With no images every fraction is nan.
    """
    readings, labels = _records(readings), _records(labels)
    if len(readings) != len(labels):
        raise ValueError(f"{len(readings)} readings but {len(labels)} labels; pass one each")
    rows = [image_scores(r, l) for r, l in zip(readings, labels)]
    out = {a: float(np.mean([row[a] for row in rows])) if rows else float("nan")
           for a in ATTRIBUTES}
    out["n"] = len(rows)
    return out


def adherence_by_group(readings, labels) -> dict[str, dict]:
    """`adherence` separately for images whose labels are all seen (colour, shape) pairs and
    those with a held-out pair (`shapes.contains_held_out`): {'seen': ..., 'held_out': ...}."""
    readings, labels = _records(readings), [_as_labels(l) for l in _records(labels)]
    if len(readings) != len(labels):
        raise ValueError(f"{len(readings)} readings but {len(labels)} labels; pass one each")
    held = [shapes.contains_held_out(l) for l in labels]
    return {name: adherence([r for r, h in zip(readings, held) if h == want],
                            [l for l, h in zip(labels, held) if h == want])
            for name, want in (("seen", False), ("held_out", True))}


def corrupt(images, noise: float, blur: float = 0.0, seed: int = 0) -> np.ndarray:
    """uint8 images with a Gaussian blur (std `blur` pixels at 32 px, scaled with the size) and
    then i.i.d. Gaussian pixel noise of std `noise` (uint8 units), rounded and clipped."""
    images = check_images(images, batched=True)
    out = images.astype(np.float64)
    if blur > 0:
        sigma = blur * images.shape[1] / 32
        out = ndimage.gaussian_filter(out, (0, sigma, sigma, 0))
    if noise > 0:
        out += np.random.default_rng(seed).normal(0.0, noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _render_examples(split: str, num: int, image_size: int, seed: int):
    examples = [shapes.generate_example(split, i, image_size, seed) for i in range(num)]
    return np.stack([e["image"] for e in examples]), examples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ldm_jax.evaluation.shapes_adherence",
        description="Accuracy of the shapes reader on rendered images, clean and corrupted.")
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--split", default="test", choices=tuple(shapes.SPLIT_IDS))
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--noise", type=float, default=DEFAULT_NOISE,
                        help="pixel noise std in uint8 units (12.75 = 0.1 on the [-1, 1] scale)")
    parser.add_argument("--blur", type=float, default=DEFAULT_BLUR,
                        help="blur std in pixels of a 32 px image, added to the noisy row")
    args = parser.parse_args(argv)
    if args.image_size not in shapes.ALLOWED_IMAGE_SIZES:
        parser.error(f"--image_size must be one of {shapes.ALLOWED_IMAGE_SIZES}")
    if args.num < 1 or args.noise < 0 or args.blur < 0:
        parser.error("--num must be positive, --noise and --blur non-negative")

    images, examples = _render_examples(args.split, args.num, args.image_size, args.seed)
    conditions = [("clean", images),
                  (f"noise {args.noise:g}", corrupt(images, args.noise, seed=1)),
                  (f"noise {args.noise:g} + blur {args.blur:g}",
                   corrupt(images, args.noise, args.blur, seed=1))]
    print(f"shapes reader: split={args.split} image_size={args.image_size} n={args.num}")
    print(f"{'condition':<24}" + "".join(f"{a:>12}" for a in ATTRIBUTES) + f"{'ms/image':>10}")
    for name, batch in conditions:
        start = time.perf_counter()
        readings = read_scenes(batch)
        ms = 1000 * (time.perf_counter() - start) / len(batch)
        acc = adherence(readings, examples)
        print(f"{name:<24}" + "".join(f"{acc[a]:>12.4f}" for a in ATTRIBUTES) + f"{ms:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
