"""Procedurally generated captioned shapes dataset (numpy + Pillow only).

Each example is one or two coloured shapes placed on a 3x3 grid over a plain
background, with an English caption and integer labels for every attribute.
Example ``i`` of a split is a pure function of ``(seed, split, i)``, so any
example can be generated on its own and the same seed gives identical bytes.

The 'train' and 'validation' splits never contain a (colour, shape) pair from
``HELD_OUT_PAIRS``; every 'test' example contains at least one such pair, so
the test split measures generalisation to unseen attribute combinations.
"""

import functools
import re

import numpy as np
from PIL import Image, ImageDraw

COLORS = ("red", "orange", "yellow", "green", "blue", "purple")
COLOR_RGB = {
    "red": (220, 40, 40),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "large")
# Object diameter as a fraction of a grid cell; small stays ~5px wide at 32px.
SIZE_FRACTION = {"small": 0.55, "large": 0.9}
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major over the 3x3 grid
POSITION_PHRASES = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
BACKGROUNDS = ("gray", "black", "white", "beige")
BACKGROUND_RGB = {
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "beige": (225, 210, 175),
}

# One pair per shape, five different colours: each attribute value is still
# seen in training, only these combinations are not.
HELD_OUT_PAIRS = (
    ("red", "triangle"),
    ("orange", "circle"),
    ("green", "square"),
    ("blue", "cross"),
    ("purple", "diamond"),
)

ALLOWED_IMAGE_SIZES = (32, 64, 128, 256, 512)
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
MAX_OBJECTS = 2
LABEL_KEYS = (
    "num_objects", "background",
    "color_0", "shape_0", "size_0", "position_0",
    "color_1", "shape_1", "size_1", "position_1",
)

# How many values each label takes (an absent second object has -1 in all four of its keys).
LABEL_SIZES = {
    "num_objects": MAX_OBJECTS + 1, "background": len(BACKGROUNDS),
    **{f"{attr}_{k}": n for k in range(MAX_OBJECTS)
       for attr, n in (("color", len(COLORS)), ("shape", len(SHAPES)),
                       ("size", len(SIZES)), ("position", len(POSITIONS)))},
}

_SUPERSAMPLE = 4
# Fraction of the free margin inside a cell used for position jitter, so an
# object never leaves its cell.
_JITTER = 0.5
# Minimum "redmean" colour distance between an object and its background.
_MIN_CONTRAST = 180.0


def color_distance(a, b) -> float:
    """Cheap perceptual RGB distance (the 'redmean' approximation)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    rmean = (a[0] + b[0]) / 2.0
    d = a - b
    return float(np.sqrt((2 + rmean / 256) * d[0] ** 2 + 4 * d[1] ** 2
                         + (2 + (255 - rmean) / 256) * d[2] ** 2))


def is_visible(color: str, background: str) -> bool:
    return color_distance(COLOR_RGB[color], BACKGROUND_RGB[background]) >= _MIN_CONTRAST


_HELD_OUT_IDX = frozenset((COLORS.index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS)
_ALL_PAIRS = tuple((c, s) for c in range(len(COLORS)) for s in range(len(SHAPES)))


@functools.lru_cache(maxsize=None)
def _pair_pool(background: int, held_out: bool | None) -> tuple:
    """(colour, shape) index pairs visible on `background`.

    held_out=True: only held-out pairs; False: only non-held-out; None: all.
    """
    bg = BACKGROUNDS[background]
    return tuple(p for p in _ALL_PAIRS
                 if is_visible(COLORS[p[0]], bg)
                 and (held_out is None or (p in _HELD_OUT_IDX) == held_out))


def contains_held_out(labels: dict) -> bool:
    """True if any object in `labels` is a held-out (colour, shape) pair."""
    return any((int(labels[f"color_{k}"]), int(labels[f"shape_{k}"])) in _HELD_OUT_IDX
               for k in range(int(labels["num_objects"])))


def check_image_size(image_size: int) -> None:
    if image_size not in ALLOWED_IMAGE_SIZES:
        raise ValueError(
            f"image_size must be one of {ALLOWED_IMAGE_SIZES}, got {image_size!r}")


def check_max_objects(max_objects: int) -> None:
    if max_objects not in range(1, MAX_OBJECTS + 1):
        raise ValueError(f"max_objects must be 1..{MAX_OBJECTS}, got {max_objects!r}")


def _sample_labels(rng: np.random.Generator, split: str, max_objects: int = MAX_OBJECTS) -> dict:
    background = int(rng.integers(len(BACKGROUNDS)))
    num_objects = int(rng.integers(1, max_objects + 1))
    positions = rng.choice(len(POSITIONS), size=num_objects, replace=False)
    sizes = rng.integers(len(SIZES), size=num_objects)
    if split == "test":
        # First object drawn is held-out; a second one may be anything.
        pools = [_pair_pool(background, True), _pair_pool(background, None)]
    else:
        pools = [_pair_pool(background, False)] * 2
    pairs = [pools[k][int(rng.integers(len(pools[k])))] for k in range(num_objects)]
    # Canonical slot order = reading order of grid cells, which is also the
    # order objects are mentioned in the caption.
    objects = sorted(zip(positions.tolist(), sizes.tolist(), pairs))
    labels = {"num_objects": num_objects, "background": background}
    for k in range(MAX_OBJECTS):
        if k < num_objects:
            pos, size, (color, shape) = objects[k]
        else:
            pos = size = color = shape = -1
        labels.update({f"color_{k}": int(color), f"shape_{k}": int(shape),
                       f"size_{k}": int(size), f"position_{k}": int(pos)})
    return labels


def _shape_polygon(shape: str, cx: float, cy: float, r: float):
    """Polygon (or ellipse bbox for circles) of half-size r centred at (cx, cy)."""
    if shape == "circle":
        return [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        h = 0.85 * r  # slightly smaller so its area is close to the circle's
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Upright; the vertical span is centred on the cell.
        return [(cx, cy - r), (cx + r, cy + 0.85 * r), (cx - r, cy + 0.85 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        w = 0.36 * r  # half arm width
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
                (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
                (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def render(labels: dict, image_size: int, offsets=None) -> np.ndarray:
    """Draw the scene described by `labels` as a uint8 (S, S, 3) array.

    offsets: optional per-object (dx, dy) in units of the maximum jitter, each
    in [-1, 1]; zero (cell centre) when omitted.
    """
    check_image_size(image_size)
    canvas = image_size * _SUPERSAMPLE
    cell = canvas / 3.0
    img = Image.new("RGB", (canvas, canvas), BACKGROUND_RGB[BACKGROUNDS[labels["background"]]])
    draw = ImageDraw.Draw(img)
    for k in range(int(labels["num_objects"])):
        row, col = divmod(int(labels[f"position_{k}"]), 3)
        frac = SIZE_FRACTION[SIZES[labels[f"size_{k}"]]]
        max_shift = _JITTER * (1.0 - frac) / 2.0 * cell
        dx, dy = (0.0, 0.0) if offsets is None else offsets[k]
        cx = (col + 0.5) * cell + dx * max_shift
        cy = (row + 0.5) * cell + dy * max_shift
        shape = SHAPES[labels[f"shape_{k}"]]
        fill = COLOR_RGB[COLORS[labels[f"color_{k}"]]]
        geom = _shape_polygon(shape, cx, cy, frac * cell / 2.0)
        if shape == "circle":
            draw.ellipse(geom, fill=fill)
        else:
            draw.polygon(geom, fill=fill)
    # Box-filter downsampling gives the anti-aliasing.
    return np.asarray(img.reduce(_SUPERSAMPLE), dtype=np.uint8)


def describe(example_or_labels: dict) -> str:
    """Caption built from integer labels (an example dict works too)."""
    lab = example_or_labels
    parts = []
    for k in range(int(lab["num_objects"])):
        parts.append("a {} {} {} {}".format(
            SIZES[lab[f"size_{k}"]], COLORS[lab[f"color_{k}"]],
            SHAPES[lab[f"shape_{k}"]], POSITION_PHRASES[POSITIONS[lab[f"position_{k}"]]]))
    return " and ".join(parts) + f" on a {BACKGROUNDS[lab['background']]} background"


def _alt(words) -> str:
    # Longest first so "at the top left" wins over "at the top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJ_RE = r"a ({}) ({}) ({}) ({})".format(
    _alt(SIZES), _alt(COLORS), _alt(SHAPES), _alt(POSITION_PHRASES.values()))
_CAPTION_RE = re.compile(r"^{0}(?: and {0})? on a ({1}) background$".format(
    _OBJ_RE, _alt(BACKGROUNDS)))
_PHRASE_TO_POS = {p: POSITIONS.index(name) for name, p in POSITION_PHRASES.items()}


def parse_caption(caption: str) -> dict:
    """Inverse of `describe`: caption -> integer labels. Raises ValueError."""
    m = _CAPTION_RE.match(caption)
    if m is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    g = m.groups()
    labels = {"num_objects": 1 if g[4] is None else 2,
              "background": BACKGROUNDS.index(g[8])}
    for k in range(MAX_OBJECTS):
        size, color, shape, phrase = g[4 * k: 4 * k + 4]
        present = size is not None
        labels.update({
            f"color_{k}": COLORS.index(color) if present else -1,
            f"shape_{k}": SHAPES.index(shape) if present else -1,
            f"size_{k}": SIZES.index(size) if present else -1,
            f"position_{k}": _PHRASE_TO_POS[phrase] if present else -1,
        })
    return labels


def cell_bounds(position: int, image_size: int) -> tuple:
    """(y0, y1, x0, x1) pixel bounds of grid cell `position` (row-major)."""
    row, col = divmod(int(position), 3)
    edges = np.round(np.linspace(0, image_size, 4)).astype(int)
    return int(edges[row]), int(edges[row + 1]), int(edges[col]), int(edges[col + 1])


def generate_example(split: str, index: int, image_size: int, seed: int = 0,
                     max_objects: int = MAX_OBJECTS) -> dict:
    """Example `index` of `split`: {'image', 'caption', *LABEL_KEYS}.

    image is uint8 (S, S, 3); caption a str; labels are Python ints with -1
    for the absent second object. max_objects=1 gives one object per scene (an easier
    task: nothing to bind attributes to, counts always 1); the held-out pairs are the same.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
    check_image_size(image_size)
    check_max_objects(max_objects)
    if index < 0 or seed < 0:
        raise ValueError("index and seed must be non-negative")
    rng = np.random.default_rng([int(seed), SPLIT_IDS[split], int(index)])
    labels = _sample_labels(rng, split, max_objects)
    offsets = rng.uniform(-1.0, 1.0, size=(labels["num_objects"], 2))
    example = {"image": render(labels, image_size, offsets), "caption": describe(labels)}
    example.update(labels)
    return example


def make_grid(images, cols: int, pad: int = 2) -> np.ndarray:
    """Tile same-sized uint8 images into one preview image."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    rows = -(-n // cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = im
    return grid
