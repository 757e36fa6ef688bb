"""Write a batch of images as one image grid (PNG, JPEG, ...)."""
from __future__ import annotations

import io
import json
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
        _write_captions(path, captions)
    return path


def png_info(metadata: dict | None):
    """PNG text chunks (tEXt) holding `metadata`, one per key; None for no metadata."""
    if not metadata:
        return None
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(str(key), value if isinstance(value, str) else json.dumps(value))
    return info


def read_png_metadata(path: str) -> dict:
    """The text chunks of a PNG (what `png_info` wrote), values as stored (str)."""
    with Image.open(path) as image:
        return dict(image.text)


def captioned_grid(pixels: np.ndarray, captions, min_size: int = 128, text_width: int = 220,
                   padding: int = 4) -> np.ndarray:
    """uint8 (N, H, W, 3) -> one image with each picture, enlarged (nearest) to at least
    `min_size` pixels, and its caption written to its right, in a near-square grid."""
    from PIL import ImageDraw, ImageFont
    n, h, w, _ = pixels.shape
    zoom = max(1, math.ceil(min_size / max(h, w)))
    ch, cw = h * zoom, w * zoom
    cell_w, cell_h = cw + text_width + padding, ch + padding
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * cell_w + padding, rows * cell_h + padding), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (picture, caption) in enumerate(zip(pixels, captions)):
        r, k = divmod(i, cols)
        x, y = padding + k * cell_w, padding + r * cell_h
        canvas.paste(Image.fromarray(picture).resize((cw, ch), Image.NEAREST), (x, y))
        line_y = y
        for line in _wrap(draw, font, str(caption), text_width - 2 * padding):
            draw.text((x + cw + padding, line_y), line, fill="black", font=font)
            line_y += 12
    return np.asarray(canvas)


def _wrap(draw, font, text: str, width: int) -> list:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


def save_captioned_grid(images, path: str, captions, metadata: dict | None = None) -> str:
    """[-1, 1] images as one captioned grid (see `captioned_grid`), with PNG metadata; the
    captions also go to PATH.txt as `save_grid` writes them."""
    grid = captioned_grid(to_uint8(images), captions)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path, pnginfo=png_info(metadata))
    _write_captions(path, captions)
    return path


def _write_captions(path: str, captions) -> None:
    cols = math.ceil(math.sqrt(len(captions)))
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        for i, caption in enumerate(captions):
            r, k = divmod(i, cols)
            f.write(f"{r + 1}, {k + 1}: {caption}\n")


def save_images(images, folder: str, captions=None, metadata=None) -> str:
    """Each [-1, 1] image as FOLDER/000000.png, ... (what FID tools read) and, with `captions`,
    FOLDER/captions.txt (one line per image). The grid goes beside the folder, as
    FOLDER_grid.png, so the folder holds the samples only. `metadata` (one dict per image)
    goes into each PNG's text chunks. Returns the folder."""
    pixels = to_uint8(images)  # NaN/Inf raise before anything is written
    folder = os.path.normpath(folder)
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(pixels):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"),
                                    pnginfo=png_info(metadata[i] if metadata else None))
    if captions is not None:
        with open(os.path.join(folder, "captions.txt"), "w") as f:
            f.writelines(f"{i:06d}.png: {caption}\n" for i, caption in enumerate(captions))
    Image.fromarray(make_grid(pixels)).save(folder + "_grid.png")
    return folder
