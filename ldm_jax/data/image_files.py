"""Image files as training examples: decoding (PNG, JPEG, WebP; grayscale, palette and RGBA made
RGB), resizing so the shorter side is the training size, and the record a source returns.

A file that cannot be decoded (corrupt, truncated, zero bytes, not an image) raises
`BadImage`; sources catch it, count it and substitute a deterministic neighbour, so a bad file
never stops a run nor changes which examples the other slots of a batch hold. The square crop
happens later, in the input pipeline, where the random one can depend on the stream position.
"""
from __future__ import annotations

import io
import threading

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


class BadImage(Exception):
    """A file that is not a decodable image."""


def decode(data: bytes, name: str = "") -> Image.Image:
    """Bytes of a PNG/JPEG/WebP file -> an RGB PIL image, fully decoded (a truncated file fails
    here, not later). Transparent pixels are composited on white."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise BadImage(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int) -> np.ndarray:
    """uint8 (H, W, 3) with min(H, W) == size, aspect ratio kept (bicubic, antialiased when
    shrinking)."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        image = image.resize(new, Image.BICUBIC, reducing_gap=3.0 if scale < 1 else None)
    return np.asarray(image, np.uint8)


def square_crop(image: np.ndarray, size: int, offset: float | None = None) -> np.ndarray:
    """The size x size crop of an image whose shorter side is `size`: centred, or at `offset`
    in [0, 1] along the longer side (a random crop draws it)."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    if min(h, w) != size:
        raise ValueError(f"square_crop expects a shorter side of {size}, got {h}x{w}")
    where = 0.5 if offset is None else offset
    top = int(round((h - size) * where))
    left = int(round((w - size) * where))
    return image[top:top + size, left:left + size]


class SkipCounter:
    """How many unreadable files a source substituted (thread-safe; grain reads in threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.count = 0
        self.last = ""

    def add(self, reason: str) -> None:
        with self._lock:
            self.count += 1
            self.last = reason
