"""Read the labels of a shapes-dataset image back from its pixels (numpy + scipy, no training).

The reader inverts `ldm_jax.data.shapes.render` analytically:

1. The image is block-averaged to a working size of at most 64 px (all allowed sizes are
   multiples of 32, so this is exact box filtering; it also averages away pixel noise).
2. Background: the per-channel median pixel (objects cover under 15% of the image), named by
   the nearest background palette colour.
3. Objects: pixels far from the background in a lightly smoothed copy, grouped into connected
   components and split at grid-cell borders; a cell whose part covers enough of it holds one
   object, and that cell is its position (small overhangs join the object they belong to).
4. Colour: the palette colour whose line from the background best explains the object's pixels
   (anti-aliased edge pixels are mixtures of object and background, so they lie on that line).
5. Coverage ("alpha") of every pixel by the object: its projection on that line. Its sum is the
   object's area, its mean position the centroid.
6. Shape: each of the five shapes, rasterised exactly (as `render` draws it) with the measured
   area and centroid, is compared with the alpha map; the closest wins. To tolerate generated
   images, each is also tried slightly blurred, with a fitted colour level (washed-out colours)
   and, for the two best, shifted by a quarter pixel (noise moves the centroid).
   Size: the winning shape's half-size against the two size fractions of a grid cell.
"""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage

from ldm_jax.data import shapes

__all__ = ["read_scene", "read_scenes", "check_images"]

_WORK_SIZE = 64
_PALETTE = np.array([shapes.COLOR_RGB[c] for c in shapes.COLORS], np.float64)
_BACKGROUND_PALETTE = np.array([shapes.BACKGROUND_RGB[b] for b in shapes.BACKGROUNDS], np.float64)
# A pixel is "object" when its (smoothed) distance from the background exceeds this; the
# dimmest visible object (purple on gray) is 108 away, so this is ~40% coverage for it.
_OBJECT_DISTANCE = 45.0
# A cell holds an object when this much of it (in cell areas) is covered; the smallest object
# (a small triangle) covers ~0.14 of a cell.
_MIN_OBJECT_AREA = 0.07
# Shape area / r^2 and centroid offset / r (downwards) for the half-size r that `render` uses.
_SHAPE_AREA = {"circle": np.pi, "square": 1.7 ** 2, "triangle": 1.85, "diamond": 2.0,
               "cross": 2 * 2 * 0.72 - 0.72 ** 2}
_SHAPE_CENTROID_DY = {"circle": 0.0, "square": 0.0, "triangle": (-1 + 0.85 + 0.85) / 3,
                      "diamond": 0.0, "cross": 0.0}
# Radius between the small and large sizes (geometric mean), as a fraction of a cell.
_SIZE_SPLIT = np.sqrt(shapes.SIZE_FRACTION["small"] * shapes.SIZE_FRACTION["large"]) / 2
# Gaussian blurs (std in pixels at 32 px) tried on the templates.
_BLURS = np.array([0.0, 0.5, 1.0])
# Sub-pixel shifts of the centroid tried for the two best-fitting shapes.
_SHIFTS = [(dx, dy) for dx in (-0.25, 0.0, 0.25) for dy in (-0.25, 0.0, 0.25) if dx or dy]
# The level of an object's full pixels, 1 for a palette colour and lower for a washed-out one,
# is fitted per shape: refinement steps, its range, and the weight of the prior that it is 1
# (a free level would also help wrong shapes fit blurred or noisy objects).
_LEVEL_STEPS = 2
_LEVEL_RANGE = (0.6, 1.0)
_LEVEL_PRIOR = 2.0
_SUBSAMPLES = 4  # per pixel and axis, for the rasterised shape templates


def check_images(images, batched: bool) -> np.ndarray:
    """The uint8 image (or batch) as an array, or a one-line ValueError naming the fix."""
    want = "(N, S, S, 3)" if batched else "(S, S, 3)"
    arr = np.asarray(images)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images, got dtype {arr.dtype}; convert model output in [-1, 1] with "
            "np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)")
    ndim = 4 if batched else 3
    if (arr.ndim != ndim or arr.shape[-1] != 3 or arr.shape[-2] != arr.shape[-3]
            or arr.shape[-2] not in shapes.ALLOWED_IMAGE_SIZES):
        raise ValueError(
            f"expected a {want} RGB image array with S in {shapes.ALLOWED_IMAGE_SIZES}, got shape "
            f"{arr.shape}; pass square RGB images at a dataset size"
            + ("" if batched else " (use read_scenes for a batch)"))
    return arr


def read_scenes(images) -> list[dict]:
    """Labels read from each uint8 (N, S, S, 3) image: a list of `read_scene` dicts."""
    return [_read(img) for img in check_images(images, batched=True)]


def read_scene(image) -> dict:
    """Labels read from one uint8 (S, S, 3) image, keyed by `shapes.LABEL_KEYS`.

    Values are ints, -1 for an absent second object (and for a found object's shape and size in
    the degenerate case that it has no coverage). num_objects is the number of objects found (it
    may be 0 or above 2); the two slots hold the two largest objects in reading order.
    """
    return _read(check_images(image, batched=False))


def _read(image: np.ndarray) -> dict:
    img = _working_image(image)
    size = img.shape[0]
    bg = np.median(img.reshape(-1, 3), axis=0)
    labels = {"num_objects": 0,
              "background": int(np.argmin(np.linalg.norm(_BACKGROUND_PALETTE - bg, axis=1)))}
    objects = _find_objects(img, bg)
    labels["num_objects"] = len(objects)
    # Keep the two largest, then put them in canonical (reading) order.
    kept = sorted(sorted(objects, key=lambda o: -o[1].sum())[:shapes.MAX_OBJECTS],
                  key=lambda o: o[0])
    for k in range(shapes.MAX_OBJECTS):
        if k < len(kept):
            cell, mask = kept[k]
            others = np.zeros_like(mask)
            for c, m in objects:
                if c != cell:
                    others |= m
            color, shape, size_class = _describe_object(img, bg, mask, others, size)
        else:
            cell = color = shape = size_class = -1
        labels.update({f"color_{k}": color, f"shape_{k}": shape,
                       f"size_{k}": size_class, f"position_{k}": cell})
    return labels


def _working_image(image: np.ndarray) -> np.ndarray:
    """float64 copy, block-averaged down to at most _WORK_SIZE pixels a side."""
    factor = image.shape[0] // min(image.shape[0], _WORK_SIZE)
    if factor == 1:
        return image.astype(np.float64)
    n = image.shape[0] // factor
    # Integer sums first: far cheaper than converting every pixel of a 512 px image to float.
    sums = image.reshape(n, factor, n, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
    return sums / float(factor * factor)


def _cell_index(size: int) -> np.ndarray:
    """(size, size) grid cell (0..8, row-major) of each pixel centre."""
    band = np.minimum(((np.arange(size) + 0.5) * 3 / size).astype(int), 2)
    return band[:, None] * 3 + band[None, :]


def _find_objects(img: np.ndarray, bg: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """[(cell, boolean pixel mask)] of the objects, one per occupied cell, in cell order."""
    size = img.shape[0]
    smooth = ndimage.uniform_filter(img, size=(3, 3, 1), mode="nearest")
    # Blend so thin parts (a small cross's arms) survive: smoothing is only to tame noise.
    dist = np.linalg.norm(0.5 * (smooth + img) - bg, axis=-1)
    components, count = ndimage.label(dist > _OBJECT_DISTANCE, structure=np.ones((3, 3)))
    cells = _cell_index(size)
    min_area = _MIN_OBJECT_AREA * (size / 3) ** 2
    by_cell = {}
    for comp in range(1, count + 1):
        pixels = components == comp
        if pixels.sum() < min_area / 2:
            continue  # noise speck
        # Split at cell borders; a part is an object of its own when its coverage is
        # object-sized (two adjacent objects touching), else it is an overhang of the largest
        # part. Coverage, not pixel count: the mask bleeds a pixel past high-contrast edges.
        parts = {int(c): pixels & (cells == c) for c in np.unique(cells[pixels])}
        areas = {c: _coverage_area(img, bg, part, (components > 0) & ~part)
                 for c, part in parts.items()}
        main = max(areas, key=areas.get)
        if areas[main] < min_area:
            continue
        for cell, part in parts.items():
            target = cell if areas[cell] >= min_area else main
            by_cell[target] = by_cell.get(target, np.zeros_like(pixels)) | part
    return [(cell, mask) for cell, mask in sorted(by_cell.items())]


def _coverage_area(img, bg, mask, others) -> float:
    """Area (pixels) covered by the object on `mask`, counting one pixel around it but not
    `others`. Unclipped coverage, so that pixel noise averages out instead of adding up."""
    direction = _PALETTE[_nearest_color_line(img[mask] - bg, bg)] - bg
    region = ndimage.binary_dilation(mask, structure=np.ones((3, 3))) & ~others
    return float(((img[region] - bg) @ direction).sum() / max(direction @ direction, 1.0))


def _bounds(mask):
    ys, xs = np.nonzero(mask)
    return (ys.min(), ys.max() + 1), (xs.min(), xs.max() + 1)


def _describe_object(img, bg, mask, others, size) -> tuple[int, int, int]:
    """(colour, shape, size) indices of the object covering `mask`."""
    # Two pixels of margin keep a blurred edge's coverage inside the measured region.
    region = ndimage.binary_dilation(mask, structure=np.ones((3, 3)), iterations=2) & ~others
    (y0, y1), (x0, x1) = _bounds(region)
    inside = region[y0:y1, x0:x1]
    color = _nearest_color_line(img[mask] - bg, bg)
    direction = _PALETTE[color] - bg
    # Unclipped coverage, so that pixel noise averages out of the area and centroid.
    alpha = (img[y0:y1, x0:x1] - bg) @ direction / max(direction @ direction, 1.0)
    alpha = np.where(inside, alpha, 0.0)
    if alpha.sum() <= 0:
        return color, -1, -1  # nothing of that colour after all: shape and size unreadable
    shape, radius = _fit_shape(alpha, inside, (y0, x0), blur_px=_BLURS * size / 32)
    return color, shape, int(radius / (size / 3) > _SIZE_SPLIT)


def _fit_shape(alpha, inside, origin, blur_px) -> tuple[int, float]:
    """(shape index, half-size in pixels) of the rasterised shape closest to the coverage map
    `alpha` (a crop whose top-left pixel is at `origin`), each shape scaled to its area."""
    y0, x0 = origin
    h, w = alpha.shape
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w] + 0.5
    area = alpha.sum()
    cy, cx = (alpha * yy).sum() / area, (alpha * xx).sum() / area
    # Unclipped: clipping would bias noisy pixels near 0 and 1 towards soft (blurred) shapes.
    observed = alpha[inside]
    pad = int(np.ceil(3 * blur_px.max()))
    box = (y0 - pad, y0 + h + pad, x0 - pad, x0 + w + pad)
    blurs = [(_blur_matrix(h, pad, b), _blur_matrix(w, pad, b)) for b in blur_px]

    def fit(name, dx=0.0, dy=0.0):
        """(squared error, half-size) of shape `name` at its best blur and level."""
        level = 1.0
        for _ in range(_LEVEL_STEPS):
            # A washed-out object (level < 1) covers more than its coverage sum says.
            r = np.sqrt(area / (level * _SHAPE_AREA[name]))
            sharp = _coverage(name, cx + dx, cy + dy - _SHAPE_CENTROID_DY[name] * r, r, box)
            # Generated images are often soft: the shape blurred a little may fit better.
            err, level = min(_fit_level(observed, (by @ sharp @ bx.T)[inside])
                             for by, bx in blurs)
        return err, r

    fits = {name: fit(name) for name in shapes.SHAPES}
    # Noise moves the centroid: give the two best candidates a second look, shifted a little.
    for name in sorted(fits, key=fits.get)[:2]:
        fits[name] = min([fits[name]] + [fit(name, dx, dy) for dx, dy in _SHIFTS])
    best = min(fits, key=fits.get)
    return shapes.SHAPES.index(best), float(fits[best][1])


def _fit_level(observed, template) -> tuple[float, float]:
    """(error, level): the template scaled to the object's full-pixel level (least squares,
    pulled towards 1 by a prior) against the observed coverage."""
    tt = max(template @ template, 1e-9)
    level = (observed @ template / tt + _LEVEL_PRIOR) / (1 + _LEVEL_PRIOR)
    level = float(np.clip(level, *_LEVEL_RANGE))
    err = np.square(observed - level * template).sum() + _LEVEL_PRIOR * (1 - level) ** 2 * tt
    return float(err), level


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, pad: int, sigma: float) -> np.ndarray:
    """(n, n + 2 pad) matrix: Gaussian blur of a padded axis, cropped back to its middle n."""
    t = np.arange(n)[:, None] + pad - np.arange(n + 2 * pad)[None, :]
    if sigma == 0:
        return (t == 0).astype(np.float64)
    g = np.exp(-0.5 * (t / sigma) ** 2) * (np.abs(t) <= 4 * sigma)
    return g / np.exp(-0.5 * (np.arange(-pad, pad + 1) / sigma) ** 2).sum()


def _nearest_color_line(pix: np.ndarray, bg: np.ndarray) -> int:
    """Palette colour whose background-to-colour segment is closest to the pixels (P, 3),
    each pixel weighted by how far it is from the background (cores count most)."""
    dirs = _PALETTE - bg                                   # (C, 3)
    t = np.clip(pix @ dirs.T / np.maximum((dirs * dirs).sum(1), 1.0), 0.0, 1.0)  # (P, C)
    resid = np.linalg.norm(pix[:, None, :] - t[..., None] * dirs[None], axis=-1)  # (P, C)
    weight = np.linalg.norm(pix, axis=-1, keepdims=True)
    return int(np.argmin((weight * resid).sum(0)))


def _coverage(name: str, cx: float, cy: float, r: float, box) -> np.ndarray:
    """Fraction of each pixel of `box` = (y0, y1, x0, x1) covered by shape `name` of half-size
    r centred at (cx, cy), in the geometry of `shapes._shape_polygon`."""
    y0, y1, x0, x1 = box
    out = np.zeros((y1 - y0, x1 - x0))
    # Sample only the pixels the shape's bounding square can touch.
    sy0, sy1 = max(y0, int(np.floor(cy - r))), min(y1, int(np.ceil(cy + r)))
    sx0, sx1 = max(x0, int(np.floor(cx - r))), min(x1, int(np.ceil(cx + r)))
    if sy1 <= sy0 or sx1 <= sx0:
        return out
    n = _SUBSAMPLES
    offs = (np.arange(n) + 0.5) / n
    dy = ((np.arange(sy0, sy1)[:, None] + offs).reshape(-1) - cy)[:, None]
    dx = ((np.arange(sx0, sx1)[:, None] + offs).reshape(-1) - cx)[None, :]
    ady, adx = np.abs(dy), np.abs(dx)
    if name == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif name == "square":
        inside = (adx <= 0.85 * r) & (ady <= 0.85 * r)
    elif name == "diamond":
        inside = adx + ady <= r
    elif name == "cross":
        arm = 0.36 * r  # half arm width
        inside = ((adx <= arm) & (ady <= r)) | ((ady <= arm) & (adx <= r))
    else:  # triangle: apex at -r, base at +0.85 r
        inside = (dy >= -r) & (dy <= 0.85 * r) & (adx <= (dy + r) / 1.85)
    h, w = sy1 - sy0, sx1 - sx0
    counts = inside.view(np.uint8).reshape(h, n, w * n).sum(axis=1).reshape(h, w, n).sum(-1)
    out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = counts / (n * n)
    return out
