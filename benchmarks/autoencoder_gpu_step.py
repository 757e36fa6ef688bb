"""The first-stage train step on one GPU: SD-VAE-shaped KL autoencoder (ch 128, mult (1,2,4,4))
with the PatchGAN active, float32 against bfloat16 compute, images/s after compilation.

PYTHONPATH=. python benchmarks/autoencoder_gpu_step.py --size=256 --batch=8
Imports only the model, loss and step modules (no data pipeline), so it runs wherever jax,
flax, optax and ml_collections are installed.
"""
import argparse
import time

import jax
import numpy as np

from configs import autoencoder_kl_f8_sd
from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.training import autoencoder_step
from ldm_jax.training.optimizer import make_optimizer


def measure(size: int, batch: int, dtype: str, steps: int) -> dict:
    c = autoencoder_kl_f8_sd.get_config()
    c.data.image_size = size
    c.loss.perceptual_weight = 0.0
    c.loss.disc_start = 0  # the full step: generator, adaptive weight, discriminator
    m = c.model
    model = AutoencoderKL(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                          z_channels=m.z_channels, resolution=size,
                          dtype=jax.numpy.dtype(dtype))
    disc = NLayerDiscriminator(ndf=c.loss.disc_channels, n_layers=c.loss.disc_layers)
    tx, lr_fn = make_optimizer(c.optimizer, c.training.num_steps)
    start = time.time()
    state = jax.jit(lambda k: autoencoder_step.init_state(c, model, disc, tx, tx, k,
                                                          (size, size, 3)))(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.time() - start
    step = jax.jit(autoencoder_step.make_train_step(c, model, disc, tx, tx, lr_fn, "kl"),
                   donate_argnums=(0,))
    x = {"image": np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)}
    start = time.time()
    state, metrics = step(state, x)
    jax.block_until_ready(metrics)
    compile_s = time.time() - start
    start = time.time()
    for _ in range(steps):
        state, metrics = step(state, x)
    jax.block_until_ready(metrics)
    per_step = (time.time() - start) / steps
    return {"dtype": dtype, "init_s": init_s, "compile_s": compile_s, "step_ms": 1000 * per_step,
            "img_s": batch / per_step, "loss": float(metrics["loss"]),
            "finite": bool(np.all([np.isfinite(float(v)) for v in metrics.values()]))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}; jax {jax.__version__}")
    for dtype in ("float32", "bfloat16"):
        r = measure(args.size, args.batch, dtype, args.steps)
        print(f"{r['dtype']:>8}: init {r['init_s']:.1f}s, compile+1 {r['compile_s']:.1f}s, "
              f"{r['step_ms']:.1f} ms/step, {r['img_s']:.1f} img/s at {args.size}^2 batch "
              f"{args.batch}, loss {r['loss']:.1f}, all metrics finite: {r['finite']}",
              flush=True)


if __name__ == "__main__":
    main()
