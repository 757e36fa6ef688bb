"""The Stable Diffusion v1 U-Net (configs/sd_v1.py, random weights) on whatever JAX runs on:
parameter count, a guided sampling run at batch 1 (30 DDIM steps, conditional and
unconditional halves in one batch of 2), and the bf16 training step (fp32 master weights,
AdamW, EMA) at 64x64 latents (512x512 images), with peak memory and, where XLA reports the
step's FLOPs, the achieved TFLOP/s.

PYTHONPATH=. python benchmarks/sd_unet.py --train_batches=1 --sample_size=64        # CPU
PYTHONPATH=. python benchmarks/sd_unet.py --train_batches=8,32 --peak_tflops=989    # a GPU
Imports only the U-Net, the samplers and the schedules (no data pipeline, no torch).
"""
import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import sd_v1
from ldm_jax.diffusion import guidance, samplers, schedules
from ldm_jax.models import attention_impl, remat
from ldm_jax.models.unet import UNet, count_params

CONTEXT_LEN = 77


REMAT = "none"  # --remat: model.remat's policy text, e.g. res=full (less memory)
ATTENTION = "auto"  # --attention: model.attention (auto | xla | cudnn | chunked)


def build_unet(dtype) -> UNet:
    c = sd_v1.get_config()
    m = c.model
    return UNet(base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attention_levels=tuple(m.attention_levels),
                num_heads=m.num_heads, norm_eps=1e-5, downsample_padding=1, in_channels=4,
                out_channels=4, freq_shift=0.0, flip_sin_to_cos=True,
                context_dim=c.text_encoder.width, transformer_depth=m.transformer_depth,
                use_linear_projection=m.use_linear_projection, remat=REMAT,
                attention=ATTENTION, dtype=dtype)


def _schedule(config):
    d = config.diffusion
    return schedules.make_schedule(d.schedule, d.num_timesteps, beta_start=d.beta_start,
                                   beta_end=d.beta_end)


def init_fn():
    unet = build_unet(jnp.float32)
    return jax.jit(lambda k: unet.init(k, jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32),
                                       context=jnp.zeros((1, CONTEXT_LEN, 768)))["params"])


def peak_bytes() -> int:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: the process's peak


def flops_of(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost["flops"])
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def timed(fn, *args, repeats: int):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return out, (time.perf_counter() - start) / repeats


def sampling(params, size: int, steps: int, dtype, repeats: int) -> dict:
    unet = build_unet(dtype)
    config = sd_v1.get_config()
    schedule = _schedule(config)
    ctx = jax.random.normal(jax.random.PRNGKey(1), (2, CONTEXT_LEN, config.text_encoder.width))

    @jax.jit
    def run(params, rng, ctx):
        def model_fn(x, t):
            out = unet.apply({"params": params}, jnp.concatenate([x, x]),
                             jnp.concatenate([t, t]), context=ctx)
            c, u = jnp.split(out.astype(jnp.float32), 2)
            return guidance.combine(c, u, 7.5, 0.0)
        return samplers.sample(model_fn, schedule, rng, (1, size, size, 4), sampler="ddim",
                               num_steps=steps, clip_denoised=False, steps_offset=1,
                               final_alpha_cumprod=None)

    start = time.perf_counter()
    compiled = run.lower(params, jax.random.PRNGKey(0), ctx).compile()
    compile_s = time.perf_counter() - start
    _, seconds = timed(compiled, params, jax.random.PRNGKey(0), ctx, repeats=repeats)
    return {"what": f"guided DDIM, {steps} steps, batch 1, {size * 8}x{size * 8}",
            "dtype": jnp.dtype(dtype).name, "compile_s": round(compile_s, 1),
            "seconds": round(seconds, 3), "it_per_s": round(steps / seconds, 2)}


def training(params, size: int, batch: int, repeats: int, peak_tflops: float | None) -> dict:
    unet = build_unet(jnp.bfloat16)
    config = sd_v1.get_config()
    schedule = _schedule(config)
    tx = optax.adamw(1e-5, weight_decay=0.01)
    state = {"params": params, "ema": jax.tree_util.tree_map(jnp.copy, params),
             "opt": tx.init(params)}
    rng = np.random.default_rng(0)
    z0 = jnp.asarray(rng.standard_normal((batch, size, size, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((batch, CONTEXT_LEN, config.text_encoder.width)),
                      jnp.float32)

    def step(state, z0, ctx, key):
        k_t, k_n = jax.random.split(key)
        t = jax.random.randint(k_t, (batch,), 0, schedule.num_timesteps)
        noise = jax.random.normal(k_n, z0.shape)
        x_t = (schedule.sqrt_alphas_cumprod[t][:, None, None, None] * z0
               + schedule.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise)

        def loss_fn(p):
            eps = unet.apply({"params": p}, x_t, t, context=ctx)
            return jnp.mean((eps.astype(jnp.float32) - noise) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        p = optax.apply_updates(state["params"], updates)
        ema = jax.tree_util.tree_map(lambda e, q: 0.9999 * e + 1e-4 * q, state["ema"], p)
        return {"params": p, "ema": ema, "opt": opt}, loss

    fn = jax.jit(step, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = fn.lower(state, z0, ctx, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start
    flops = flops_of(compiled)
    state, loss = compiled(state, z0, ctx, jax.random.PRNGKey(0))
    jax.block_until_ready(loss)
    start = time.perf_counter()
    for i in range(repeats):
        state, loss = compiled(state, z0, ctx, jax.random.PRNGKey(i + 1))
    jax.block_until_ready(loss)
    seconds = (time.perf_counter() - start) / repeats
    out = {"what": f"bf16 train step, batch {batch}, {size}x{size} latents"
                   + (f", remat {REMAT}" if REMAT != "none" else "")
                   + (f", attention {ATTENTION}" if ATTENTION != "auto" else ""),
           "compile_s": round(compile_s, 1), "seconds": round(seconds, 3),
           "images_per_s": round(batch / seconds, 2), "loss": round(float(loss), 4),
           "peak_gib": round(peak_bytes() / 2 ** 30, 2)}
    if flops:
        out["tflops"] = round(flops / seconds / 1e12, 1)
        if peak_tflops:
            out["mfu"] = round(flops / seconds / 1e12 / peak_tflops, 3)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sample_size", type=int, default=64, help="latent side (64 = 512x512)")
    p.add_argument("--sample_steps", type=int, default=30)
    p.add_argument("--sample_dtype", default="bfloat16")
    p.add_argument("--train_batches", default="1", help="comma-separated; empty skips")
    p.add_argument("--train_size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak_tflops", type=float, default=None, help="the chip's dense bf16 peak")
    p.add_argument("--remat", default="none", help="model.remat in the training step: none | "
                   "full | save_dots, or per block type, e.g. res=full,transformer=save_dots")
    p.add_argument("--attention", default="auto", choices=attention_impl.IMPLEMENTATIONS,
                   help="model.attention: the attention kernel")
    p.add_argument("--skip_sampling", action="store_true")
    args = p.parse_args()
    global REMAT, ATTENTION
    REMAT, ATTENTION = args.remat, args.attention
    remat.parse(REMAT)  # a typo fails here, not after the sampling run
    print(json.dumps({"devices": [str(d) for d in jax.devices()]}), flush=True)
    init = init_fn()
    start = time.perf_counter()
    params = init(jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    print(json.dumps({"unet_params": count_params(params),
                      "init_s": round(time.perf_counter() - start, 1)}), flush=True)
    if not args.skip_sampling:
        dtype = jnp.dtype(args.sample_dtype)
        cast = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        print(json.dumps(sampling(cast, args.sample_size, args.sample_steps, dtype,
                                  args.repeats) | {"peak_gib": round(peak_bytes() / 2 ** 30, 2)}),
              flush=True)
        del cast
    for batch in [int(b) for b in args.train_batches.split(",") if b]:
        params = params if params is not None else init(jax.random.PRNGKey(0))
        try:
            print(json.dumps(training(params, args.train_size, batch, args.repeats,
                                      args.peak_tflops)), flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: report, try the next
            print(json.dumps({"train_batch": batch, "failed": str(e).splitlines()[0][:300]}),
                  flush=True)
        params = None  # donated to the training step


if __name__ == "__main__":
    main()
