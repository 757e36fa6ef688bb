"""Images/s of the training input pipeline alone (decode, resize, crop, flip, batch) for the user
data sources, against the train step it feeds.

PYTHONPATH=. python benchmarks/input_pipeline.py --threads=2 --batches=40
It writes its own data under --dir (default a temporary folder): JPEG photos-like pictures of
512x384 read at 64x64 and at 256x256 from a folder, and the same pictures in two LAION-style
tar shards read at 256x256; then times `pipeline.make_train_iterator` over each after one warm-up
batch, and the configs/ddpm_folder.py train step at 64x64 (the U-Net a 64x64 folder feeds).
"""
import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

from configs import ddpm_folder
from ldm_jax.data import pipeline


def _pictures(n: int, seed: int = 0):
    """JPEG bytes of smooth random pictures (compress like photos, unlike noise)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((512, 384), Image.BICUBIC)
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        yield buf.getvalue()


def write_data(root: str, n: int) -> tuple[str, str]:
    folder = os.path.join(root, "folder")
    os.makedirs(folder, exist_ok=True)
    shards = [tarfile.open(os.path.join(root, f"{s:06d}.tar"), "w") for s in range(2)]
    for i, data in enumerate(_pictures(n)):
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
        for name, payload in ((f"{i:06d}.jpg", data), (f"{i:06d}.txt", b"a picture")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            shards[i % 2].addfile(info, io.BytesIO(payload))
    for shard in shards:
        shard.close()
    return folder, os.path.join(root, "{000000..000001}.tar")


def pipeline_rate(name: str, path: str, size: int, threads: int, batches: int,
                  batch: int = 32) -> dict:
    config = ddpm_folder.get_config()
    d = config.data
    d.name, d.path, d.image_size, d.num_threads, d.crop = name, path, size, threads, "random"
    source = pipeline.load_source(d, square=False)
    it = pipeline.make_train_iterator(source, d, batch, seed=0)
    next(it)  # threads started, first batch decoded
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return {"source": name, "size": size, "threads": threads,
            "images_per_s": round(batches * batch / seconds, 1)}


def train_step_rate(size: int, batch: int, steps: int) -> dict:
    """The ddpm_folder U-Net's train step on random images (no input pipeline)."""
    import jax
    from ldm_jax.training import ddpm_stage
    from ldm_jax.training.optimizer import make_optimizer
    config = ddpm_folder.get_config()
    config.data.image_size = size
    model = ddpm_stage.build_model(config)
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    state = jax.jit(lambda k: ddpm_stage.init_state(config, model, tx, k))(jax.random.PRNGKey(0))
    step = jax.jit(ddpm_stage.make_train_step(config, model, ddpm_stage.build_schedule(config),
                                              tx, lr_fn), donate_argnums=(0,))
    images = {"image": np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3))
              .astype(np.float32)}
    state, metrics = step(state, images)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, images)
    jax.block_until_ready(metrics)
    return {"train_step": f"configs/ddpm_folder.py U-Net, {size}x{size}, batch {batch}",
            "images_per_s": round(steps * batch / (time.perf_counter() - start), 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default=None)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--train_steps", type=int, default=3)
    args = p.parse_args()
    root = args.dir or tempfile.mkdtemp()
    folder, shards = write_data(root, args.images)
    for name, path, size in (("folder", folder, 64), ("folder", folder, 256),
                             ("webdataset", shards, 256)):
        print(json.dumps(pipeline_rate(name, path, size, args.threads, args.batches)),
              flush=True)
    if args.train_steps:
        print(json.dumps(train_step_rate(64, 16, args.train_steps)), flush=True)


if __name__ == "__main__":
    main()
