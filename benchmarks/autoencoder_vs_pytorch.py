"""Our KL autoencoder (JAX/Flax) against diffusers' AutoencoderKL (PyTorch) on this CPU, fp32.

The SD-VAE-shaped kl-f8 model (ch 128, ch_mult (1, 2, 4, 4), 2 res blocks, z 4, attention in
the middle blocks only). Times a training step without the optimizer update (encode, posterior
sample, decode, L1 + 1e-6 * KL loss, gradients of every parameter) and an inference pass
(encode, sample, decode), alternating ours / PyTorch within each repetition. Both sides start
from the same weights: PyTorch's random ones, converted with ldm_jax.convert, after checking
that the two compute the same loss and gradients. Peak resident memory is measured in separate
child processes (`--only=jax`, `--only=torch`), as in unet_cifar10_vs_pytorch.py, whose
helpers this script reuses.

    PYTHONPATH=. python benchmarks/autoencoder_vs_pytorch.py [--reps 5] [--batch 2] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from unet_cifar10_vs_pytorch import _spread, peak_rss_gib, timed  # noqa: E402 (adds ROOT too)

KL_WEIGHT = 1e-6  # LDM's kl-f8 training weight; the L1 term dominates


def diffusers_config(quick: bool, size: int) -> dict:
    """The SD VAE's layout (diffusers AutoencoderKL kwargs), or a tiny one for a smoke check.

    `sample_size` only names the levels' resolutions (attention placement); with attention in
    the middle blocks only, it does not change the model."""
    if quick:
        return dict(in_channels=3, out_channels=3, block_out_channels=[32, 64],
                    down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
                    latent_channels=4, norm_num_groups=32, sample_size=size)
    return dict(in_channels=3, out_channels=3, block_out_channels=[128, 256, 512, 512],
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
                latent_channels=4, norm_num_groups=32, sample_size=size)


def make_batch(batch: int, size: int, f: int, z_channels: int, seed: int = 0):
    """Images in [-1, 1] and the posterior's standard-normal noise, both NCHW float32.

    The noise is an input of the step on both sides (z = mean + std * eps), so both sample
    the same latents; drawing it inside the step would cost a few microseconds."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    eps = rng.randn(batch, z_channels, size // f, size // f).astype(np.float32)
    return x, eps


def _nhwc(a):
    import jax.numpy as jnp
    return jnp.asarray(a.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- JAX side

def jax_setup(cfg: dict, batch: int, params=None, opt_level: int | None = None):
    """Model, compiled train / inference steps, and the compile and init times."""
    import jax
    import jax.numpy as jnp

    from ldm_jax.convert.diffusers_autoencoder import autoencoder_kl_config_to_model_kwargs
    from ldm_jax.models.autoencoder import AutoencoderKL, downsampling_factor, init_params

    kw = autoencoder_kl_config_to_model_kwargs(cfg)
    model = AutoencoderKL(**kw)
    x, eps = make_batch(batch, cfg["sample_size"], downsampling_factor(kw["ch_mult"]),
                        kw["z_channels"])
    x, eps = _nhwc(x), _nhwc(eps)

    opts = None if opt_level is None else {"xla_backend_optimization_level": opt_level}
    init = jax.jit(lambda k: init_params(model, k), compiler_options=opts)
    start = time.perf_counter()
    fresh = jax.block_until_ready(init(jax.random.key(0)))
    init_s = time.perf_counter() - start
    params = fresh if params is None else params
    del fresh

    def reconstruct(p, x, eps):
        posterior = model.apply({"params": p}, x, method=model.encode)
        z = posterior.mean + posterior.std * eps
        return model.apply({"params": p}, z, method=model.decode), posterior

    def loss_fn(p, x, eps):
        rec, posterior = reconstruct(p, x, eps)
        return jnp.mean(jnp.abs(x - rec)) + KL_WEIGHT * jnp.mean(posterior.kl())

    start = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss_fn), compiler_options=opts).lower(
        params, x, eps).compile()
    compile_s = time.perf_counter() - start
    forward = jax.jit(lambda p, x, eps: reconstruct(p, x, eps)[0], compiler_options=opts)
    jax.block_until_ready(forward(params, x, eps))

    def run_train():
        return jax.block_until_ready(step(params, x, eps))  # (loss, grads)

    def run_forward():
        jax.block_until_ready(forward(params, x, eps))

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    return dict(train=run_train, forward=run_forward, compile_s=compile_s, init_s=init_s,
                n_params=n_params, kwargs=kw)


# ------------------------------------------------------------------------- PyTorch side

def torch_setup(cfg: dict, batch: int, threads: int):
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoencoderKL(**cfg).train()
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    x, eps = (torch.from_numpy(a) for a in make_batch(batch, cfg["sample_size"], f,
                                                      cfg["latent_channels"]))

    def reconstruct():
        posterior = model.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps
        return model.decode(z).sample, posterior

    def run_train():
        model.zero_grad(set_to_none=True)
        rec, posterior = reconstruct()
        loss = torch.mean(torch.abs(x - rec)) + KL_WEIGHT * torch.mean(posterior.kl())
        loss.backward()
        return loss

    def run_forward():
        with torch.inference_mode():
            reconstruct()

    n_params = sum(p.numel() for p in model.parameters())
    return dict(train=run_train, forward=run_forward, n_params=n_params, model=model)


def torch_reference(torch_side: dict, kwargs: dict):
    """Our params converted from PyTorch's, and PyTorch's loss and gradients (converted to our
    layout) for one train step on these weights and this batch, to compare with ours.

    Gradients are named like the weights, so the weight converter converts them too."""
    from ldm_jax.convert.diffusers_autoencoder import autoencoder_kl_state_dict_to_params

    model = torch_side["model"]
    params = autoencoder_kl_state_dict_to_params(
        {k: v.detach().numpy() for k, v in model.state_dict().items()}, kwargs)
    torch_loss = float(torch_side["train"]().detach())
    torch_grads = autoencoder_kl_state_dict_to_params(
        {k: p.grad.numpy() for k, p in model.named_parameters()}, kwargs)
    model.zero_grad(set_to_none=True)
    return params, torch_loss, torch_grads


def compare(ours_loss, ours_grads, torch_loss, torch_grads):
    """Relative loss difference, and the worst gradient difference over all tensors (with its
    name), each relative to that tensor's largest PyTorch gradient but at least 1e-3 of the
    model's: some gradients are zero but for rounding (a conv bias feeding a GroupNorm with one
    channel per group), and their relative differences are noise."""
    from flax import traverse_util

    loss_err = abs(float(ours_loss) - torch_loss) / abs(torch_loss)
    ours_flat = traverse_util.flatten_dict(ours_grads)
    ref_flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(torch_grads).items()}
    floor = 1e-3 * max(float(np.abs(v).max()) for v in ref_flat.values())
    worst, worst_name = 0.0, ""
    for path, ref in ref_flat.items():
        err = float(np.abs(np.asarray(ours_flat[path]) - ref).max())
        err /= max(float(np.abs(ref).max()), floor)
        if err > worst:
            worst, worst_name = err, "/".join(path)
    return loss_err, worst, worst_name


# --------------------------------------------------------------------------------- driver

def peak_rss_only(which: str, args) -> None:
    """Child process: build one side, run three train and forward steps, print peak RSS."""
    cfg = diffusers_config(args.quick, args.size)
    if which == "jax":
        side = jax_setup(cfg, args.batch, opt_level=args.opt_level)
    else:
        side = torch_setup(cfg, args.batch, args.threads)
    if args.malloc_trim:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for _ in range(3):
        side["train"]()
        side["forward"]()
    print(json.dumps({"peak_gib": peak_rss_gib()}))


def child_peak(which: str, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), f"--only={which}", f"--batch={args.batch}",
           f"--size={args.size}", f"--threads={args.threads}"]
    cmd += ["--quick"] * args.quick + ["--malloc-trim"] * args.malloc_trim
    cmd += ["--xla-defaults"] * args.xla_defaults
    cmd += [] if args.opt_level is None else [f"--opt-level={args.opt_level}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=128, help="image height and width")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (JAX uses every core by default)")
    p.add_argument("--quick", action="store_true", help="tiny autoencoder, for a smoke check")
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc malloc_trim(0) after set-up in the memory runs (both sides)")
    p.add_argument("--opt-level", type=int, choices=[0, 1, 2, 3],
                   help="XLA backend optimisation level for our compiles (XLA's default: 3)")
    p.add_argument("--xla-defaults", action="store_true",
                   help="leave XLA's CPU defaults alone instead of ldm_jax.xla_cpu's flags")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick and args.size == 128:
        args.size = 32
    if not args.xla_defaults:
        from ldm_jax.xla_cpu import use_fast_cpu_flags
        use_fast_cpu_flags()  # as train.py; children inherit XLA_FLAGS through the environment
    if args.only:
        return peak_rss_only(args.only, args)

    load_start = os.getloadavg()[0]
    # Children first, while this process is still small (see peak_rss_gib).
    peak = None if args.no_memory else {"jax": child_peak("jax", args),
                                        "torch": child_peak("torch", args)}
    cfg = diffusers_config(args.quick, args.size)
    torch_side = torch_setup(cfg, args.batch, args.threads)
    from ldm_jax.convert.diffusers_autoencoder import autoencoder_kl_config_to_model_kwargs
    params, torch_loss, torch_grads = torch_reference(
        torch_side, autoencoder_kl_config_to_model_kwargs(cfg))
    ours = jax_setup(cfg, args.batch, params=params, opt_level=args.opt_level)
    if ours["n_params"] != torch_side["n_params"]:
        raise SystemExit(f"parameter counts differ: ours {ours['n_params']:,}, "
                         f"PyTorch {torch_side['n_params']:,}")
    ours_loss, ours_grads = ours["train"]()
    loss_err, grad_err, grad_worst = compare(ours_loss, ours_grads, torch_loss, torch_grads)
    del ours_grads, torch_grads
    if loss_err > 1e-4 or grad_err > 1e-3:
        raise SystemExit(f"ours and PyTorch disagree: loss {float(ours_loss):.6f} against "
                         f"{torch_loss:.6f} (rel. {loss_err:.1e}), gradients up to {grad_err:.1e} "
                         f"({grad_worst}); the models differ")

    times = {k: [] for k in ("jax_train", "torch_train", "jax_fwd", "torch_fwd")}
    for rep in range(args.warmup + args.reps):
        row = {"jax_train": timed(ours["train"]), "torch_train": timed(torch_side["train"]),
               "jax_fwd": timed(ours["forward"]), "torch_fwd": timed(torch_side["forward"])}
        if rep >= args.warmup:
            for k, v in row.items():
                times[k].append(v)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}

    print(f"\nAutoencoderKL {'(quick) ' if args.quick else ''}{ours['n_params']:,} parameters "
          f"on both sides; batch {args.batch}, {args.size}x{args.size}, fp32, "
          f"{args.threads} threads; median of {args.reps} interleaved reps (spread ours "
          f"{_spread(times['jax_train'])}, PyTorch {_spread(times['torch_train'])} train)")
    print(f"same weights: loss ours {float(ours_loss):.6f}, PyTorch {torch_loss:.6f} "
          f"(rel. difference {loss_err:.1e}); worst gradient rel. difference {grad_err:.1e} "
          f"({grad_worst})")
    print(f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'; "
          f"XLA backend opt level {args.opt_level if args.opt_level is not None else 'default'}; "
          f"malloc_trim in the memory runs {'on' if args.malloc_trim else 'off'}\n")
    rows = [
        ("train step (enc+sample+dec, L1+KL, grads), ms", med["torch_train"], med["jax_train"],
         "<= 1.0x PyTorch", med["jax_train"] <= med["torch_train"]),
        ("forward (enc+sample+dec, inference), ms", med["torch_fwd"], med["jax_fwd"], "", None),
        ("train-step compile, s", None, ours["compile_s"], "", None),
        ("param init (jit incl. compile), s", None, ours["init_s"], "", None),
    ] + ([] if args.no_memory else [
        ("peak RSS, GiB", peak["torch"], peak["jax"], "<= 1.5x PyTorch",
         peak["jax"] <= 1.5 * peak["torch"]),
    ])
    print(f"1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end on "
          f"{os.cpu_count()} CPUs: other processes skew the timings, PyTorch's (OpenMP) far more "
          "than ours.\n")
    print("| metric | PyTorch | ours | ours/PyTorch | target | met |")
    print("|---|---:|---:|---:|---|---|")
    for name, theirs, mine, target, ok in rows:
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        theirs_s = f"{theirs:.2f}" if theirs is not None else "-"
        met = "" if ok is None else ("yes" if ok else "no")
        print(f"| {name} | {theirs_s} | {mine:.2f} | {ratio} | {target} | {met} |")


if __name__ == "__main__":
    main()
