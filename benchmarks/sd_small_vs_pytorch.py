"""Our "sd-small" latent U-Net (JAX/Flax) against diffusers' UNet2DConditionModel (PyTorch) on
this CPU, fp32.

The Stable Diffusion v1 layout at small width: block widths 64/128/256/256, cross-attention
transformers at the first three levels and in the middle, 2 res blocks per level, 8 heads,
cross_attention_dim 256, 4 latent channels, 32x32 latents, text context of 77 tokens. Times a
train step (noise, forward, eps MSE, backward, AdamW) at batch 4 and a classifier-free-guidance
sampling step (one forward at batch 8: conditional and unconditional halves) alternating ours /
PyTorch within each repetition. Both sides start from the same weights (PyTorch's random ones,
converted with ldm_jax.convert) after checking that their forward outputs agree. Peak resident
memory is measured in separate child processes (`--only=jax`, `--only=torch`), as in
unet_cifar10_vs_pytorch.py, whose helpers this script reuses.

    PYTHONPATH=. python benchmarks/sd_small_vs_pytorch.py [--reps 5] [--batch 4] [--quick]
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
from unet_cifar10_vs_pytorch import (LR, WEIGHT_DECAY, _spread, peak_rss_gib,  # noqa: E402
                                     timed)

CONTEXT_LEN = 77  # CLIP's text length, as SD v1


def diffusers_config(quick: bool) -> dict:
    """UNet2DConditionModel kwargs of the sd-small U-Net, or a tiny one for a smoke check."""
    if quick:
        return dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1,
                    norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32)
    return dict(sample_size=32, in_channels=4, out_channels=4,
                block_out_channels=[64, 128, 256, 256],
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                layers_per_block=2, norm_num_groups=32, attention_head_dim=8,
                cross_attention_dim=256)


def make_batch(cfg: dict, batch: int, seed: int = 0):
    """Latents x0, noise (NCHW float32), timesteps (int64), text context (B, 77, D) and SD's
    scaled-linear alpha-bar table."""
    rng = np.random.RandomState(seed)
    size, ch = cfg["sample_size"], cfg["in_channels"]
    x0 = rng.randn(batch, ch, size, size).astype(np.float32)
    noise = rng.randn(batch, ch, size, size).astype(np.float32)
    t = rng.randint(0, 1000, batch)
    context = rng.randn(batch, CONTEXT_LEN, cfg["cross_attention_dim"]).astype(np.float32)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas).astype(np.float32)
    return x0, noise, t, context, alpha_bar


def cfg_inputs(cfg: dict, batch: int, seed: int = 3):
    """One CFG step's model input at 2 x batch: the same latents twice, one timestep, the
    prompts' context and the empty prompt's (here: another random context)."""
    x, _, _, context, _ = make_batch(cfg, batch, seed)
    uncond = np.random.RandomState(seed + 1).randn(*context.shape).astype(np.float32)
    return (np.concatenate([x, x]), np.full(2 * batch, 500),
            np.concatenate([uncond, context]))


# ----------------------------------------------------------------------------- JAX side

def jax_setup(cfg: dict, batch: int, params=None, opt_level: int | None = None):
    """Model, state, compiled train / CFG steps and the compile and init times."""
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.convert.diffusers_unet2d_condition import unet2d_condition_config_to_model_kwargs
    from ldm_jax.models.initializers import init_from_one_draw
    from ldm_jax.models.unet import UNet

    model = UNet(**unet2d_condition_config_to_model_kwargs(cfg))
    x0, noise, t, context, alpha_bar = make_batch(cfg, batch)
    x0, noise = (jnp.asarray(a.transpose(0, 2, 3, 1)) for a in (x0, noise))
    t, context, alpha_bar = jnp.asarray(t, jnp.int32), jnp.asarray(context), jnp.asarray(alpha_bar)
    cx, ct, cctx = cfg_inputs(cfg, batch)
    cx, ct, cctx = jnp.asarray(cx.transpose(0, 2, 3, 1)), jnp.asarray(ct, jnp.int32), jnp.asarray(cctx)

    opts = None if opt_level is None else {"xla_backend_optimization_level": opt_level}
    # As the training stage initialises: jitted, batch-1 inputs, one shared random draw.
    x1, t1 = jnp.zeros((1,) + x0.shape[1:]), jnp.zeros((1,), jnp.int32)
    c1 = jnp.zeros((1, CONTEXT_LEN, context.shape[-1]))
    init = jax.jit(lambda k: init_from_one_draw(
        lambda kk: model.init({"params": kk}, x1, t1, context=c1), k), compiler_options=opts)
    start = time.perf_counter()
    init_params = jax.block_until_ready(init(jax.random.key(0))["params"])
    init_s = time.perf_counter() - start
    params = init_params if params is None else params
    del init_params

    tx = optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=WEIGHT_DECAY)
    state = (params, tx.init(params))

    def train_step(state, x0, noise, t, context, rng):
        params, opt_state = state

        def loss_fn(p):
            ab = alpha_bar[t][:, None, None, None]
            x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise
            out = model.apply({"params": p}, x_t, t, context=context, train=True,
                              rngs={"dropout": rng})
            return jnp.mean(jnp.square(out - noise))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    rng = jax.random.key(1)
    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0, compiler_options=opts).lower(
        state, x0, noise, t, context, rng).compile()
    compile_s = time.perf_counter() - start
    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, context=c),
                      compiler_options=opts)
    jax.block_until_ready(forward(params, cx, ct, cctx))

    box = {"state": state}

    def run_train():
        box["state"], loss = step(box["state"], x0, noise, t, context, rng)
        jax.block_until_ready((box["state"], loss))

    def run_cfg():
        jax.block_until_ready(forward(box["state"][0], cx, ct, cctx))

    n_params = sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
    return dict(train=run_train, cfg=run_cfg, compile_s=compile_s, init_s=init_s,
                n_params=n_params, step=step)


# ------------------------------------------------------------------------- PyTorch side

def torch_setup(cfg: dict, batch: int, threads: int):
    import torch
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg)
    x0, noise, t, context, alpha_bar = (torch.from_numpy(a) for a in make_batch(cfg, batch))
    cx, ct, cctx = (torch.from_numpy(a) for a in cfg_inputs(cfg, batch))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=WEIGHT_DECAY)

    def run_train():
        model.train()
        opt.zero_grad(set_to_none=True)
        ab = alpha_bar[t][:, None, None, None]
        x_t = ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise
        out = model(x_t, t, encoder_hidden_states=context).sample
        loss = torch.mean(torch.square(out - noise))
        loss.backward()
        opt.step()

    def run_cfg():
        model.eval()
        with torch.inference_mode():
            model(cx, ct, encoder_hidden_states=cctx)

    n_params = sum(p.numel() for p in model.parameters())
    return dict(train=run_train, cfg=run_cfg, n_params=n_params, model=model)


def check_same_model(cfg: dict, torch_model, batch: int):
    """Convert PyTorch's weights, compare forward outputs; returns (our params, rel. error)."""
    import jax.numpy as jnp
    import torch

    from ldm_jax.convert.diffusers_unet2d_condition import (
        unet2d_condition_config_to_model_kwargs, unet2d_condition_state_dict_to_params)
    from ldm_jax.models.unet import UNet

    kw = unet2d_condition_config_to_model_kwargs(cfg)
    params = unet2d_condition_state_dict_to_params(
        {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}, kw)
    x, _, t, context, _ = make_batch(cfg, batch, seed=5)
    torch_model.eval()
    with torch.inference_mode():
        ref = torch_model(torch.from_numpy(x), torch.from_numpy(t),
                          encoder_hidden_states=torch.from_numpy(context)).sample.numpy()
    out = UNet(**kw).apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                           jnp.asarray(t, jnp.int32), context=jnp.asarray(context))
    err = float(np.abs(np.asarray(out).transpose(0, 3, 1, 2) - ref).max() / np.abs(ref).max())
    if err > 1e-4:
        raise SystemExit(f"ours and PyTorch disagree (max rel. error {err:.2e}); configs differ")
    return params, err


# --------------------------------------------------------------------------------- driver

def peak_rss_only(which: str, args) -> None:
    """Child process: build one side, run three train and CFG steps, print peak RSS as JSON."""
    cfg = diffusers_config(args.quick)
    if which == "jax":
        side = jax_setup(cfg, args.batch, opt_level=args.opt_level)
    else:
        side = torch_setup(cfg, args.batch, args.threads)
    if args.malloc_trim:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for _ in range(3):
        side["train"]()
        side["cfg"]()
    print(json.dumps({"peak_gib": peak_rss_gib()}))


def child_peak(which: str, args) -> float:
    cmd = [sys.executable, os.path.abspath(__file__), f"--only={which}", f"--batch={args.batch}",
           f"--threads={args.threads}"]
    cmd += ["--quick"] * args.quick + ["--malloc-trim"] * args.malloc_trim
    cmd += ["--xla-defaults"] * args.xla_defaults
    cmd += [] if args.opt_level is None else [f"--opt-level={args.opt_level}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first")
    p.add_argument("--batch", type=int, default=4, help="train batch; the CFG step runs 2x this")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (JAX uses every core by default)")
    p.add_argument("--quick", action="store_true", help="tiny U-Net, for a smoke check")
    p.add_argument("--malloc-trim", action="store_true",
                   help="call glibc malloc_trim(0) after set-up in the memory runs (both sides)")
    p.add_argument("--opt-level", type=int, choices=[0, 1, 2, 3],
                   help="XLA backend optimisation level for our compiles (XLA's default: 3)")
    p.add_argument("--xla-defaults", action="store_true",
                   help="leave XLA's CPU defaults alone instead of ldm_jax.xla_cpu's flags")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    p.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.xla_defaults:
        from ldm_jax.xla_cpu import use_fast_cpu_flags
        use_fast_cpu_flags()  # as train.py; children inherit XLA_FLAGS through the environment
    if args.only:
        return peak_rss_only(args.only, args)

    load_start = os.getloadavg()[0]
    # Children first, while this process is still small (see peak_rss_gib).
    peak = None if args.no_memory else {"jax": child_peak("jax", args),
                                        "torch": child_peak("torch", args)}
    cfg = diffusers_config(args.quick)
    torch_side = torch_setup(cfg, args.batch, args.threads)
    params, rel_err = check_same_model(cfg, torch_side["model"], args.batch)
    ours = jax_setup(cfg, args.batch, params=params, opt_level=args.opt_level)
    del params
    if ours["n_params"] != torch_side["n_params"]:
        raise SystemExit(f"parameter counts differ: ours {ours['n_params']:,}, "
                         f"PyTorch {torch_side['n_params']:,}")

    times = {k: [] for k in ("jax_train", "torch_train", "jax_cfg", "torch_cfg")}
    for rep in range(args.warmup + args.reps):
        row = {"jax_train": timed(ours["train"]), "torch_train": timed(torch_side["train"]),
               "jax_cfg": timed(ours["cfg"]), "torch_cfg": timed(torch_side["cfg"])}
        if rep >= args.warmup:
            for k, v in row.items():
                times[k].append(v)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    load_end = os.getloadavg()[0]

    size = cfg["sample_size"]
    print(f"\nsd-small U-Net {'(quick) ' if args.quick else ''}{ours['n_params']:,} parameters on "
          f"both sides; forward max rel. difference {rel_err:.1e}; train batch {args.batch}, CFG "
          f"batch {2 * args.batch}, {size}x{size}x{cfg['in_channels']} latents, context "
          f"{CONTEXT_LEN}x{cfg['cross_attention_dim']}, fp32, {args.threads} threads; median of "
          f"{args.reps} interleaved reps (spread ours {_spread(times['jax_train'])}, PyTorch "
          f"{_spread(times['torch_train'])} train)")
    print(f"XLA_FLAGS='{os.environ.get('XLA_FLAGS', '')}'; "
          f"XLA backend opt level {args.opt_level if args.opt_level is not None else 'default'}; "
          f"malloc_trim in the memory runs {'on' if args.malloc_trim else 'off'}\n")
    rows = [
        ("train step (fwd+bwd+AdamW), ms", med["torch_train"], med["jax_train"],
         "<= 1.0x PyTorch (aim 0.8x)", med["jax_train"] <= med["torch_train"]),
        (f"CFG step (fwd, batch {2 * args.batch}), ms", med["torch_cfg"], med["jax_cfg"],
         "<= 1.0x PyTorch", med["jax_cfg"] <= med["torch_cfg"]),
        ("train-step compile, s", None, ours["compile_s"], "<= 20 s", ours["compile_s"] <= 20),
        ("param init (jit incl. compile), s", None, ours["init_s"], "<= 5 s", ours["init_s"] <= 5),
    ] + ([] if peak is None else [
        ("peak RSS, GiB", peak["torch"], peak["jax"], "<= 1.5 GiB", peak["jax"] <= 1.5),
    ])
    print(f"1-min load average {load_start:.1f} at start, {load_end:.1f} at end on "
          f"{os.cpu_count()} CPUs: other processes skew the timings, PyTorch's (OpenMP) far more "
          "than ours.\n")
    print("| metric | PyTorch | ours | ours/PyTorch | target | met |")
    print("|---|---:|---:|---:|---|---|")
    for name, theirs, mine, target, ok in rows:
        ratio = f"{mine / theirs:.2f}" if theirs else "-"
        theirs_s = f"{theirs:.2f}" if theirs is not None else "-"
        met = "" if ok is None else ("yes" if ok else "no")
        print(f"| {name} | {theirs_s} | {mine:.2f} | {ratio} | {target} | {met} |")
    if args.json:
        result = {
            "quick": args.quick, "n_params": ours["n_params"], "forward_rel_err": rel_err,
            "batch": args.batch, "threads": args.threads, "reps": args.reps,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "opt_level": args.opt_level,
            "load_average": [load_start, load_end], "cpus": os.cpu_count(),
            "times_s": times, "median_ms": med,
            "ratio_train": med["jax_train"] / med["torch_train"],
            "ratio_cfg": med["jax_cfg"] / med["torch_cfg"],
            "compile_s": ours["compile_s"], "init_s": ours["init_s"], "peak_rss_gib": peak,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
