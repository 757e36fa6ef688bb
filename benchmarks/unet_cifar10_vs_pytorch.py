"""Our DDPM CIFAR-10 U-Net (JAX/Flax) against diffusers' UNet2DModel (PyTorch) on this CPU, fp32.

Times a full train step (forward + backward + AdamW) and a sampling step (forward only),
alternating ours / PyTorch within each repetition so both see the same machine state. Both
sides start from the same weights (PyTorch's, converted with ldm_jax.convert) after checking
that their forward outputs agree. Peak resident memory is measured in separate child
processes (`--only=jax`, `--only=torch`) so the two frameworks' allocations do not mix.

    PYTHONPATH=. python benchmarks/unet_cifar10_vs_pytorch.py [--reps 5] [--batch 8] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LR, WEIGHT_DECAY = 2e-4, 0.01  # same AdamW hyper-parameters on both sides


def diffusers_config(quick: bool, dropout: float) -> dict:
    """google/ddpm-cifar10-32's UNet2DModel config, or a tiny one for a smoke check."""
    if quick:
        return dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=[32, 64],
                    down_block_types=["DownBlock2D", "AttnDownBlock2D"],
                    up_block_types=["AttnUpBlock2D", "UpBlock2D"], layers_per_block=1,
                    norm_num_groups=8, attention_head_dim=None, norm_eps=1e-6,
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=dropout)
    return dict(sample_size=32, in_channels=3, out_channels=3,
                block_out_channels=[128, 256, 256, 256],
                down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
                layers_per_block=2, norm_num_groups=32, attention_head_dim=None, norm_eps=1e-6,
                downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=dropout)


def make_batch(batch: int, size: int, seed: int = 0):
    """x0, noise (NCHW float32), t (int64) and the DDPM linear-schedule alpha-bar table."""
    rng = np.random.RandomState(seed)
    x0 = rng.uniform(-1, 1, (batch, 3, size, size)).astype(np.float32)
    noise = rng.randn(batch, 3, size, size).astype(np.float32)
    t = rng.randint(0, 1000, batch)
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)).astype(np.float32)
    return x0, noise, t, alpha_bar


# ----------------------------------------------------------------------------- JAX side

def jax_setup(cfg: dict, batch: int, params=None, opt_level: int | None = None):
    """Model, state, compiled train / sample steps and the compile and init times.

    `opt_level` sets XLA's backend (LLVM) optimisation level for every compile here; the
    default is XLA's own (3)."""
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.convert.diffusers_unet2d import unet2d_config_to_model_kwargs
    from ldm_jax.models.initializers import init_from_one_draw
    from ldm_jax.models.unet import UNet

    model = UNet(**unet2d_config_to_model_kwargs(cfg))
    x0, noise, t, alpha_bar = make_batch(batch, cfg["sample_size"])
    x0, noise = (jnp.asarray(a.transpose(0, 2, 3, 1)) for a in (x0, noise))
    t, alpha_bar = jnp.asarray(t, jnp.int32), jnp.asarray(alpha_bar)

    opts = None if opt_level is None else {"xla_backend_optimization_level": opt_level}
    # As the training stage initialises: jitted, batch-1 inputs, one shared random draw.
    x1, t1 = jnp.zeros((1,) + x0.shape[1:]), jnp.zeros((1,), jnp.int32)
    init = jax.jit(lambda k: init_from_one_draw(lambda kk: model.init({"params": kk}, x1, t1), k),
                   compiler_options=opts)
    start = time.perf_counter()
    init_params = jax.block_until_ready(init(jax.random.key(0))["params"])
    init_s = time.perf_counter() - start
    params = init_params if params is None else params
    del init_params

    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    state = (params, tx.init(params))

    def train_step(state, x0, noise, t, rng):
        params, opt_state = state

        def loss_fn(p):
            ab = alpha_bar[t][:, None, None, None]
            x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise
            out = model.apply({"params": p}, x_t, t, train=True, rngs={"dropout": rng})
            return jnp.mean(jnp.square(out - noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    rng = jax.random.key(1)  # one dropout key for every step: the masks repeat, the work does not
    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0, compiler_options=opts).lower(
        state, x0, noise, t, rng).compile()
    compile_s = time.perf_counter() - start
    sample = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, train=False),
                     compiler_options=opts)
    jax.block_until_ready(sample(params, x0, t))

    box = {"state": state}

    def run_train():
        box["state"], loss = step(box["state"], x0, noise, t, rng)
        jax.block_until_ready((box["state"], loss))

    def run_sample():
        jax.block_until_ready(sample(box["state"][0], x0, t))

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    return dict(train=run_train, sample=run_sample, compile_s=compile_s, init_s=init_s,
                n_params=n_params, model=model)


# ------------------------------------------------------------------------- PyTorch side

def torch_setup(cfg: dict, batch: int, threads: int):
    import torch
    from diffusers import UNet2DModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet2DModel(**cfg)
    x0, noise, t, alpha_bar = (torch.from_numpy(a) for a in make_batch(batch, cfg["sample_size"]))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=WEIGHT_DECAY)

    def run_train():
        model.train()
        opt.zero_grad(set_to_none=True)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        loss = torch.mean(torch.square(model(x_t, t).sample - noise))
        loss.backward()
        opt.step()

    def run_sample():
        model.eval()
        with torch.inference_mode():
            model(x0, t)

    n_params = sum(p.numel() for p in model.parameters())
    return dict(train=run_train, sample=run_sample, n_params=n_params, model=model)


def check_same_model(cfg: dict, torch_model, batch: int):
    """Convert PyTorch's weights, compare forward outputs; returns (our params, rel. error)."""
    import jax.numpy as jnp
    import torch

    from ldm_jax.convert.diffusers_unet2d import (unet2d_config_to_model_kwargs,
                                                  unet2d_state_dict_to_params)
    from ldm_jax.models.unet import UNet

    kw = unet2d_config_to_model_kwargs(cfg)
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = unet2d_state_dict_to_params(
        sd, num_res_blocks=kw["num_res_blocks"], channel_mult=kw["channel_mult"],
        attention_resolutions=kw["attention_resolutions"], image_size=cfg["sample_size"],
        num_heads=kw["num_heads"], head_dim=kw["head_dim"])
    x0, _, t, _ = make_batch(batch, cfg["sample_size"], seed=5)
    torch_model.eval()
    with torch.inference_mode():
        ref = torch_model(torch.from_numpy(x0), torch.from_numpy(t)).sample.numpy()
    out = UNet(**kw).apply({"params": params}, jnp.asarray(x0.transpose(0, 2, 3, 1)),
                           jnp.asarray(t, jnp.int32))
    err = float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max() / np.abs(ref).max())
    if err > 1e-4:
        raise SystemExit(f"ours and PyTorch disagree (max rel. error {err:.2e}); configs differ")
    return params, err


# --------------------------------------------------------------------------------- driver

def peak_rss_only(which: str, args) -> None:
    """Child process: build one side, run warm-up + a few steps, print peak RSS as JSON."""
    cfg = diffusers_config(args.quick, args.dropout)
    if which == "jax":
        side = jax_setup(cfg, args.batch, opt_level=args.opt_level)
    else:
        side = torch_setup(cfg, args.batch, args.threads)
    if args.malloc_trim:
        # glibc keeps the compiler's freed heap mapped; hand it back before the steps run.
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for _ in range(3):
        side["train"]()
        side["sample"]()
    print(json.dumps({"peak_gib": peak_rss_gib()}))


def peak_rss_gib() -> float:
    """This process's peak resident set. VmHWM belongs to the current process image only;
    ru_maxrss (KiB on Linux) can carry over the parent's peak through fork + exec, which is
    also why main() starts the children before it allocates anything large."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child_peak(which: str, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), f"--only={which}", f"--batch={args.batch}",
           f"--dropout={args.dropout}", f"--threads={args.threads}"]
    cmd += ["--quick"] * args.quick + ["--malloc-trim"] * args.malloc_trim
    cmd += ["--xla-defaults"] * args.xla_defaults
    cmd += [] if args.opt_level is None else [f"--opt-level={args.opt_level}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1, help="on both sides (DDPM used 0.1)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (JAX uses every core by default)")
    p.add_argument("--quick", action="store_true", help="tiny U-Net, for a smoke check")
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc malloc_trim(0) after set-up in the memory runs (both sides)")
    p.add_argument("--opt-level", type=int, choices=[0, 1, 2, 3],
                   help="XLA backend optimisation level for our compiles (XLA's default: 3)")
    p.add_argument("--xla-defaults", action="store_true",
                   help="leave XLA's CPU defaults (YNNPACK fusions) on instead of ldm_jax's flags")
    p.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.xla_defaults:
        from ldm_jax.xla_cpu import use_fast_cpu_flags
        use_fast_cpu_flags()  # children inherit XLA_FLAGS through the environment
    if args.only:
        return peak_rss_only(args.only, args)

    load_start = os.getloadavg()[0]
    # Children first, while this process is still small (see peak_rss_gib).
    peak = {"jax": child_peak("jax", args), "torch": child_peak("torch", args)}
    cfg = diffusers_config(args.quick, args.dropout)
    torch_side = torch_setup(cfg, args.batch, args.threads)
    params, rel_err = check_same_model(cfg, torch_side["model"], args.batch)
    ours = jax_setup(cfg, args.batch, params=params, opt_level=args.opt_level)
    if ours["n_params"] != torch_side["n_params"]:
        raise SystemExit(f"parameter counts differ: ours {ours['n_params']:,}, "
                         f"PyTorch {torch_side['n_params']:,}")

    times = {k: [] for k in ("jax_train", "torch_train", "jax_sample", "torch_sample")}
    for rep in range(args.warmup + args.reps):
        row = {"jax_train": timed(ours["train"]), "torch_train": timed(torch_side["train"]),
               "jax_sample": timed(ours["sample"]), "torch_sample": timed(torch_side["sample"])}
        if rep >= args.warmup:
            for k, v in row.items():
                times[k].append(v)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}

    print(f"\nU-Net {'(quick) ' if args.quick else ''}{ours['n_params']:,} parameters on both "
          f"sides; forward max rel. difference {rel_err:.1e}; batch {args.batch}, "
          f"{cfg['sample_size']}x{cfg['sample_size']}, fp32, dropout {args.dropout} on both, "
          f"{args.threads} threads; median of {args.reps} interleaved reps "
          f"(spread ours {_spread(times['jax_train'])}, PyTorch {_spread(times['torch_train'])} "
          "train)")
    print(f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'; "
          f"XLA backend opt level {args.opt_level if args.opt_level is not None else 'default'}; "
          f"malloc_trim in the memory runs {'on' if args.malloc_trim else 'off'}\n")
    rows = [
        ("train step (fwd+bwd+AdamW), ms", med["torch_train"], med["jax_train"],
         "<= PyTorch", med["jax_train"] <= med["torch_train"]),
        ("sampling step (fwd), ms", med["torch_sample"], med["jax_sample"], "", None),
        ("train-step compile, s", None, ours["compile_s"], "<= 20 s", ours["compile_s"] <= 20),
        ("param init (jit incl. compile), s", None, ours["init_s"], "<= 5 s", ours["init_s"] <= 5),
        ("peak RSS, GiB", peak["torch"], peak["jax"], "<= 2 GiB", peak["jax"] <= 2),
    ]
    print(f"1-min load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end on "
          f"{os.cpu_count()} CPUs: other processes skew the timings, PyTorch's (OpenMP) far more "
          "than ours.\n")
    print("| metric | PyTorch | ours | ours/PyTorch | target | met |")
    print("|---|---:|---:|---:|---|---|")
    for name, theirs, mine, target, ok in rows:
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        theirs_s = f"{theirs:.1f}" if theirs is not None else "-"
        met = "" if ok is None else ("yes" if ok else "no")
        print(f"| {name} | {theirs_s} | {mine:.2f} | {ratio} | {target} | {met} |")


def _spread(values) -> str:
    return f"{1e3 * min(values):.0f}-{1e3 * max(values):.0f} ms"


if __name__ == "__main__":
    main()
