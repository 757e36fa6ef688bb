"""Encoding a latent-diffusion run's dataset once: the frozen first stage's latents (and a
frozen text encoder's hidden states) for every example, so training reads them instead of
decoding and encoding images at every step (`config.data.name = "latents"`).

python -m ldm_jax.data.cache --config=configs/ldm_kl8.py --out=DIR [--first_stage=WORKDIR]
    [--splits=train,validation] [--dtype=float32|float16] [--config.a.b=v ...]
The cache stores the KL posterior's moments, not one sample of it: training draws the sample
with the same key on-the-fly encoding would use, so the losses are the same. Images are centre
cropped and not flipped (a flip is decided per step, after encoding).

--dtype=float16 stores the latents and text contexts at half the bytes: for SD-size text
contexts (77x768 per caption, 236 KB in float32) those dominate the cache's disk and read
traffic. Reading casts them back to float32, so training code is the same either way; the
values differ from the float32 cache by float16 rounding (relative 2^-11).
"""
from __future__ import annotations

import json
import os
import time

import flax.serialization
import jax
import numpy as np

from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.data.latents_source import META_FILE
from ldm_jax.stages import first_stage as first_stage_lib
from ldm_jax.stages import ldm_text


# --dtype -> the numpy type latents and text contexts are stored as.
DTYPES = {"float32": np.float32, "float16": np.float16}


def _stored(values, dtype, what: str) -> np.ndarray:
    out = np.asarray(values, dtype)
    if not np.isfinite(out).all():  # float16 overflows above 65504
        raise ConfigError(f"the {what} overflow {np.dtype(dtype).name}; write the cache with "
                          "--dtype=float32")
    return out


def _record(record, keys, latents, text=None, dtype=np.float32) -> bytes:
    out = {"latents": _stored(latents, dtype, "latents")}
    for k in keys:
        out[k] = int(record[k])
    if "caption" in record:
        out["caption"] = pipeline.caption_of(record)
    if text is not None:
        out.update(text, context=_stored(text["context"], dtype, "text contexts"))
    return flax.serialization.msgpack_serialize(out)


def write_cache(config, out: str, splits=("train", "validation"), batch: int = 32,
                log=print, dtype: str = "float32") -> dict:
    """Encode `splits` of config.data with config.first_stage (and text_encoder.pretrained
    when the config names one), storing latents and contexts as `dtype` (float32 or float16,
    half the disk); returns the meta written to OUT/meta.json."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from ldm_jax import parallel
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype={dtype!r} is not one of {list(DTYPES)}; float16 halves "
                          "the cache, float32 keeps it exact")
    if config.stage != "ldm":
        raise ConfigError(f"--config is a {config.stage!r} config; the cache encodes a "
                          "latent-diffusion run's data (stage 'ldm')")
    if os.path.exists(os.path.join(out, META_FILE)):
        raise ConfigError(f"{out} already holds a latent cache; write to a new --out")
    mesh = parallel.make_mesh()
    first = first_stage_lib.load(config, mesh)
    encode = jax.jit(first.cacheable)
    text_fn = tok = None
    if config.conditioning.text and config.text_encoder.pretrained:
        module, params, tok = ldm_text.pretrained_encoder(config)
        te = config.text_encoder
        text_fn = jax.jit(lambda i, m: module.apply(
            {"params": params}, i, m if te.use_mask else None, output=te.output))
    os.makedirs(out, exist_ok=True)
    label_sizes = pipeline.label_sizes(config.data)
    keys = tuple(sorted(label_sizes))
    shape, has_captions = None, False
    for split in splits:
        source = pipeline.load_source(config.data, split=pipeline.split_name(config.data, split))
        writer = ArrayRecordWriter(os.path.join(out, f"{split}.array_record"), "group_size:1")
        start = time.time()
        for lo in range(0, len(source), batch):
            records = [source[i] for i in range(lo, min(lo + batch, len(source)))]
            images = np.stack([np.asarray(r["image"], np.float32) / 127.5 - 1.0
                               for r in records])
            latents = np.asarray(jax.device_get(encode(first.params, images)))
            texts = [None] * len(records)
            if text_fn is not None:
                ids, mask = ldm_text.encode_prompts(tok, [pipeline.caption_of(r)
                                                          for r in records])
                context = np.asarray(jax.device_get(text_fn(ids, mask)), np.float32)
                texts = [{"ids": ids[j], "mask": mask[j], "context": context[j]}
                         for j in range(len(records))]
            for r, z, text in zip(records, latents, texts):
                writer.write(_record(r, keys, z, text, DTYPES[dtype]))
            shape, has_captions = list(latents.shape[1:]), "caption" in records[0]
        writer.close()
        log(f"{split}: {len(source)} examples encoded in {time.time() - start:.1f}s")
    meta = {"first_stage": first.record(), "latent_shape": shape,
            "image_size": config.data.image_size, "data": config.data.to_dict(),
            "label_sizes": label_sizes, "has_captions": has_captions, "splits": list(splits),
            "dtype": dtype,
            "text_encoder": (os.path.abspath(config.text_encoder.pretrained)
                             if text_fn is not None else "")}
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, default=list)
    return meta


def main(argv=None):
    from absl import app, flags
    from ml_collections import config_flags

    from ldm_jax import cli
    config = config_flags.DEFINE_config_file("config", None, "A latent-diffusion config.")
    out = flags.DEFINE_string("out", None, "The folder to write the cache to (new).")
    first = flags.DEFINE_string("first_stage", None, "The first stage's workdir (default: the "
                                "config's first_stage.workdir).")
    splits = flags.DEFINE_list("splits", ["train", "validation"], "Splits to encode.")
    dtype = flags.DEFINE_string("dtype", "float32", "float32 | float16: how latents and text "
                                "contexts are stored (float16: half the disk; read as float32).")

    def run(argv):
        if config.value is None or not out.value:
            cli.fail("--config=configs/NAME.py and --out=DIR are required")
        c = config.value
        if first.value:
            c.first_stage.workdir = first.value
        with cli.readable_errors():
            write_cache(c, out.value, tuple(splits.value), dtype=dtype.value)
            print(f"wrote {out.value}; train on it with --config.data.name=latents "
                  f"--config.data.path={out.value}")
    cli.use_fast_cpu_flags()
    app.run(run, argv)
