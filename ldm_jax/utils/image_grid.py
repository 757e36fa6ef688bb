"""Write a batch of images as one image grid (PNG, JPEG, ...)."""
from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from ldm_jax.utils.paths import unwritable_reason


class ImageOutputError(ValueError):
    """An output path or a batch of images that cannot be written; the message says what to do."""


class NonFiniteImagesError(ImageOutputError):
    """The images hold NaN or Inf values (a diverged model), so no grid is written."""


def pil_can_write(extension: str) -> bool:
    """Whether PIL picks a format for `extension` (e.g. ".png") that can store an RGB image."""
    Image.init()
    fmt = Image.registered_extensions().get(extension.lower())
    if fmt not in Image.SAVE:
        return False
    try:  # some formats PIL knows only store other modes (e.g. .xbm: 1-bit)
        Image.new("RGB", (2, 2)).save(io.BytesIO(), format=fmt)
    except Exception:  # noqa: BLE001 - any failure means "not this format"
        return False
    return True


def is_folder_path(path: str) -> bool:
    """--out=DIR/ (a trailing slash): each image as its own PNG, plus the grid."""
    return path.endswith(("/", os.sep))


def check_output_path(path: str) -> None:
    """Raise ImageOutputError, before any work, when a grid could not be saved at `path`."""
    if is_folder_path(path):
        reason = unwritable_reason(path, directory=True)
        if reason:
            raise ImageOutputError(f"--out={path} cannot be created or written ({reason}); "
                                   "pass a folder you can write to")
        return
    extension = os.path.splitext(path)[1]
    if not pil_can_write(extension):
        what = f"'{extension}' is not an image format PIL can write" if extension else \
            "no file extension to pick the image format"
        raise ImageOutputError(f"--out={path}: {what}; end it with .png, .jpg or .webp "
                               "(e.g. --out=samples.png)")
    reason = unwritable_reason(path)
    if reason:
        hint = ("; end it with / to write one PNG per image into that folder"
                if reason == "it is a directory" else "")
        raise ImageOutputError(f"--out={path} cannot be written ({reason}); "
                               f"pass a path you can write to{hint}")


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8, rounding to nearest; NaN or Inf raise NonFiniteImagesError."""
    x = np.asarray(images, dtype=np.float32)
    finite = np.isfinite(x)
    if not finite.all():
        where = (f" in {int((~finite.reshape(len(x), -1).all(axis=1)).sum())} of {len(x)} images"
                 if x.ndim == 4 else "")
        raise NonFiniteImagesError(
            f"the model produced NaN/Inf values{where}: the checkpoint has probably diverged; "
            "sample an earlier one (sample.py --step) or retrain with a lower optimizer.lr")
    x = (x + 1.0) * 127.5
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
    """Save [-1, 1] float images as one grid image (format from the extension); returns the path.

    Images with NaN or Inf raise NonFiniteImagesError and nothing is written.
    With `captions` (one per image), also writes them beside the image as PATH.txt, one line
    per image in grid reading order ("row, column: caption")."""
    grid = make_grid(to_uint8(images))  # before creating anything: NaN/Inf raise here
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)
    if captions is not None:
        cols = math.ceil(math.sqrt(len(captions)))
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            for i, caption in enumerate(captions):
                r, k = divmod(i, cols)
                f.write(f"{r + 1}, {k + 1}: {caption}\n")
    return path


def save_images(images, folder: str, captions=None) -> str:
    """Each [-1, 1] image as FOLDER/000000.png, ... (what FID tools read) and, with `captions`,
    FOLDER/captions.txt (one line per image). The grid goes beside the folder, as
    FOLDER_grid.png, so the folder holds the samples only. Returns the folder."""
    pixels = to_uint8(images)  # NaN/Inf raise before anything is written
    folder = os.path.normpath(folder)
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))
    if captions is not None:
        with open(os.path.join(folder, "captions.txt"), "w") as f:
            f.writelines(f"{i:06d}.png: {caption}\n" for i, caption in enumerate(captions))
    Image.fromarray(make_grid(pixels)).save(folder + "_grid.png")
    return folder
