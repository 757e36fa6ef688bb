"""A folder of images (PNG, JPEG, WebP) as one uint8 array, for comparing image sets."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def read_folder(path: str, flag: str = "folder") -> np.ndarray:
    """All images in `path` (sorted by name, not recursive) as uint8 (N, H, W, 3).

    Grayscale and RGBA are converted to RGB; every image must have the same size, since no
    resize is applied before the Inception network's own."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag}={path}: no such folder")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"{flag}={path} holds no {'/'.join(EXTENSIONS)} images")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(path, name)) as im:
                images.append(np.asarray(im.convert("RGB")))
        except OSError as e:
            raise ValueError(f"{flag}: cannot read {os.path.join(path, name)} ({e}); remove "
                             "or replace the file") from None
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{flag}: {name} is {images[-1].shape[1]}x{images[-1].shape[0]} "
                             f"but {names[0]} is {images[0].shape[1]}x{images[0].shape[0]}; "
                             "resize the images of one folder to one size first")
    return np.stack(images)
