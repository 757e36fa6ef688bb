"""A pretrained text encoder on disk, for latent-diffusion runs that keep it frozen
(`text_encoder.pretrained=DIR`): DIR/text_encoder.json (the TextTransformer's fields),
DIR/text_encoder.msgpack (its params, flax serialisation: plain arrays, no code) and
DIR/tokenizer.json (the tokenizer it was trained with). Converters write this layout.
"""
from __future__ import annotations

import json
import os

import flax.serialization
import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.models.text_encoder import TextTransformer

ARCH_FILE, PARAMS_FILE, TOKENIZER_FILE = "text_encoder.json", "text_encoder.msgpack", "tokenizer.json"
_FIELDS = ("vocab_size", "max_length", "width", "depth", "heads", "mlp_ratio", "activation",
           "causal")


def save_pretrained(folder: str, module: TextTransformer, params, tokenizer) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ARCH_FILE), "w") as f:
        json.dump({k: getattr(module, k) for k in _FIELDS}, f, indent=2)
    params = flax.serialization.to_state_dict(params)
    with open(os.path.join(folder, PARAMS_FILE), "wb") as f:
        f.write(flax.serialization.msgpack_serialize(
            _map(lambda a: np.asarray(a, np.float32), params)))
    tokenizer.save(os.path.join(folder, TOKENIZER_FILE))
    return folder


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def load_pretrained(folder: str, dtype=None):
    """(TextTransformer, params, tokenizer) from `folder`; ConfigError naming a missing or
    damaged part."""
    from ldm_jax.data import tokenizer_file
    folder = os.path.expanduser(folder)
    for name in (ARCH_FILE, PARAMS_FILE, TOKENIZER_FILE):
        if not os.path.isfile(os.path.join(folder, name)):
            raise ConfigError(f"text_encoder.pretrained={folder} has no {name}; it needs "
                              f"{ARCH_FILE}, {PARAMS_FILE} and {TOKENIZER_FILE}")
    try:
        with open(os.path.join(folder, ARCH_FILE)) as f:
            arch = json.load(f)
        with open(os.path.join(folder, PARAMS_FILE), "rb") as f:
            params = flax.serialization.msgpack_restore(f.read())
    except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"text_encoder.pretrained={folder} is damaged ({e})") from None
    missing = [k for k in _FIELDS if k not in arch]
    if missing:
        raise ConfigError(f"{os.path.join(folder, ARCH_FILE)} lacks {missing}")
    kwargs = {k: arch[k] for k in _FIELDS}
    if dtype is not None:
        kwargs["dtype"] = dtype
    tok = tokenizer_file.load(os.path.join(folder, TOKENIZER_FILE))
    return TextTransformer(**kwargs), params, tok


def check_matches_config(module: TextTransformer, config, folder: str) -> None:
    """The run's text_encoder fields must describe the pretrained encoder (the U-Net's context
    width and the token count follow from them)."""
    te = config.text_encoder
    wrong = [f"--config.text_encoder.{k}={getattr(module, k)}" for k in
             ("width", "depth", "heads", "max_length", "causal") if te[k] != getattr(module, k)]
    if wrong:
        raise ConfigError(f"text_encoder.pretrained={folder} is a different encoder than "
                          f"text_encoder.* describes; set {' '.join(wrong)}")
