"""Checks on output paths, made before any work so a bad path fails in seconds, not hours."""
from __future__ import annotations

import os


def unwritable_reason(path: str, directory: bool = False) -> str | None:
    """Why `path` (a file, or a `directory`) could not be created or written, or None if it can.

    Creates nothing: looks at `path` if it exists, else at its nearest existing parent."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if directory != os.path.isdir(path):
            return "it is a file, not a directory" if directory else "it is a directory"
        if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
            return "no write permission"
        return None
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no write permission in {parent}"
    return None


def cache_root() -> str:
    """Where derived files live (converted weights, dataset reference features):
    $LDM_JAX_CACHE, or ~/.cache/ldm_jax."""
    return os.path.expanduser(os.environ.get("LDM_JAX_CACHE") or "~/.cache/ldm_jax")
