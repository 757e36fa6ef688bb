"""Reading a saved tokenizer (WORKDIR/tokenizer.json, a pretrained text encoder's) of either
kind: the word-level caption tokenizer or CLIP's BPE one, told apart by the file's model type."""
from __future__ import annotations

from ldm_jax.data import clip_tokenizer, tokenizer


def load(path: str) -> tokenizer.CaptionTokenizer:
    tok, data = tokenizer.read_file(path)
    if data.get("model", {}).get("type") == "BPE":
        return clip_tokenizer.from_saved(tok, path)
    return tokenizer.from_saved(tok, path)
