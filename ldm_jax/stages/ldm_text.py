"""The caption tokenizer of a text-conditioned latent-diffusion run.

Trained once on the training split's captions (word level, no download) and stored in the
workdir, so a resumed run and sample.py use exactly the same vocabulary.
"""
from __future__ import annotations

import os

import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data.pipeline import caption_of

TOKENIZER_FILE = "tokenizer.json"


def captions_of(source) -> list[str]:
    """Every caption of a random-access source, as str."""
    return [caption_of(source[i]) for i in range(len(source))]


def workdir_tokenizer(config, workdir: str, source, is_main: bool):
    """The workdir's tokenizer; process 0 trains and writes it on the first run, the other
    processes wait for it."""
    from ldm_jax import parallel
    from ldm_jax.data import tokenizer, tokenizer_file

    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path) and is_main:
        tok = tokenizer.train_word_tokenizer(captions_of(source),
                                             config.text_encoder.max_length)
        tok.save(path)
    parallel.wait_for_all_processes("tokenizer_written")
    tok = tokenizer_file.load(path)
    if tok.max_length != config.text_encoder.max_length:
        raise ConfigError(f"{path} pads to {tok.max_length} tokens but text_encoder.max_length="
                          f"{config.text_encoder.max_length}; keep the length of this run")
    return tok


def text_parts(config, workdir: str, source, is_main: bool):
    """(tokenizer, pretrained encoder module or None, its params or None) of a training run.
    A pretrained encoder brings its tokenizer, copied into the workdir for sampling."""
    if not config.conditioning.text:
        return None, None, None
    if not config.text_encoder.pretrained:
        return workdir_tokenizer(config, workdir, source, is_main), None, None
    module, params, tok = pretrained_encoder(config)
    path = os.path.join(workdir, TOKENIZER_FILE)
    if is_main and not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        tok.save(path)
    return tok, module, params


def pretrained_encoder(config):
    """(module, params, tokenizer) of text_encoder.pretrained, checked against the config."""
    from ldm_jax.models import text_encoder_io
    folder = config.text_encoder.pretrained
    module, params, tok = text_encoder_io.load_pretrained(folder)
    text_encoder_io.check_matches_config(module, config, folder)
    return module, params, tok


def load_tokenizer(workdir: str):
    from ldm_jax.data import tokenizer_file
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: a text-conditioned workdir keeps its "
                                "tokenizer there; was it copied without it?")
    return tokenizer_file.load(path)


def record_fields(tok):
    """record -> {ids, mask} of its caption, for the input pipeline."""
    def fields(record):
        ids, mask = tok.encode([caption_of(record)])
        return {"ids": ids[0], "mask": mask[0]}
    return fields


def encode_prompts(tok, prompts, warn=None):
    """(ids, mask) numpy arrays for a list of prompts; `warn(line)` hears of truncated
    prompts and of words the vocabulary lacks."""
    ids, mask = tok.encode(list(prompts), warn=warn)
    return np.asarray(ids, np.int32), np.asarray(mask, bool)
