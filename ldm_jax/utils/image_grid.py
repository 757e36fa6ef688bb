"""Write a batch of images as one PNG grid."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, rounding to nearest."""
    x = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', cols*W', C) image, as square as possible."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c),
                   pad_value, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[y:y + h, x:x + w] = img
    return grid


def save_grid(images, path: str, captions=None) -> str:
    """Save [-1, 1] float images as a PNG grid; returns the path.

    With `captions` (one per image), also writes them beside the PNG as PATH.txt, one line
    per image in grid reading order ("row, column: caption")."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(make_grid(to_uint8(images))).save(path)
    if captions is not None:
        cols = math.ceil(math.sqrt(len(captions)))
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            for i, caption in enumerate(captions):
                r, k = divmod(i, cols)
                f.write(f"{r + 1}, {k + 1}: {caption}\n")
    return path
