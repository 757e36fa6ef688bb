"""A latent cache (written by `python -m ldm_jax.data.cache`) as a training source:
`config.data.name = "latents"`, `config.data.path = DIR`.

DIR/meta.json says which first stage (workdir, checkpoint step, scale) and which frozen text
encoder made it; DIR/{train,validation}.array_record hold one msgpack record per example:
"latents" (the first stage's posterior moments or VQ latents), the dataset's labels,
"caption", and with a frozen text encoder "ids", "mask" and "context" (its hidden states).
Latents and contexts are stored as meta["dtype"] (float32, or float16 for half the disk) and
always read back as float32. msgpack holds plain arrays and strings only: reading it runs no
code.
"""
from __future__ import annotations

import json
import os

import flax.serialization
import numpy as np

from ldm_jax.config_checks import ConfigError

META_FILE = "meta.json"


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ConfigError(f"data.path={path} is not a latent cache (no {META_FILE}); write one "
                          "with `python -m ldm_jax.data.cache --config=... --out=DIR`")
    with open(meta_path) as f:
        return json.load(f)


class LatentsSource:
    def __init__(self, path: str, split: str = "train"):
        import grain
        self.path, self.split = os.path.expanduser(path), split
        self.meta = read_meta(self.path)
        file = os.path.join(self.path, f"{split}.array_record")
        if not os.path.isfile(file):
            raise ConfigError(f"the latent cache {self.path} has no {split} split; write it "
                              f"with `python -m ldm_jax.data.cache ... --splits={split}`")
        self._records = grain.sources.ArrayRecordDataSource([file])
        self.has_captions = bool(self.meta.get("has_captions"))

    def __len__(self):
        return len(self._records)

    def __getitem__(self, index):
        record = flax.serialization.msgpack_restore(self._records[index])
        for key in ("latents", "context"):  # a float16 cache: training sees float32 anyway
            if key in record and record[key].dtype != np.float32:
                record[key] = record[key].astype(np.float32)
        return record

    def describe(self) -> str:
        fs = self.meta["first_stage"]
        return (f"latent cache {self.path} ({self.split}): {len(self)} examples, latents "
                f"{'x'.join(map(str, self.meta['latent_shape']))} "
                f"{self.meta.get('dtype', 'float32')} from {fs['workdir']} (step "
                f"{fs['step']})" + (", text context cached" if self.meta.get("text_encoder")
                                    else ""))
