"""The Stable Diffusion v1 U-Net on one GPU, ours (JAX/Flax) against diffusers (PyTorch).

COMMAND (one H100/H200, under 8 minutes; random weights, nothing downloaded):
    PYTHONPATH=. python benchmarks/gpu_sd.py
    PYTHONPATH=. python benchmarks/gpu_sd.py --config=small --torch    # a CPU smoke run, ~2-4 min

Measures, in bf16 (fp32 master weights), at 64x64 latents (512x512 images):
  * the training step (noise, forward, eps MSE, backward, AdamW, EMA) at each of --batches,
    ascending until one does not fit: images/s, and MFU = step FLOPs / time / the chip's dense
    bf16 peak. The FLOPs are XLA's cost analysis of the same step lowered for the CPU backend
    (XLA-attention, no remat: the model's FLOPs), because on the GPU XLA's cost analysis does
    not see the FLOPs inside cuBLAS/cuDNN custom calls;
  * classifier-free-guidance sampling at batch 1 (the U-Net at batch 2, context 77 x 768): a
    jitted loop of --sample_steps DDIM steps, in it/s;
for each of --attention (the U-Net's `attention` setting: cudnn, xla, chunked, auto), then the
same for diffusers' UNet2DConditionModel with the same config (SDPA attention; training under
bf16 autocast with fp32 weights and fused AdamW, sampling with bf16 weights).

The JAX and the PyTorch sides run in child processes one after the other (`--only=jax|torch`),
so neither holds GPU memory the other needs; the parent prints one markdown table at the end.
This file is the command and the parent; the children are gpu_sd_jax.py and gpu_sd_torch.py,
and the helpers all three use are in gpu_sd_common.py.
--time_budget_s bounds the whole run: no measurement starts that is not expected to end in time,
and what was skipped is listed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from gpu_sd_common import (CONTEXT_LEN, GUIDANCE, ROOT, first_line, model_section,  # noqa: E402
                           peak_flops)


def run_child(which: str, args, deadline: float, records: list) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), f"--only={which}",
           f"--config={args.config}", f"--batches={args.batches}", f"--attention={args.attention}",
           f"--steps={args.steps}", f"--sample_steps={args.sample_steps}",
           f"--sample_reps={args.sample_reps}", f"--remat={args.remat}",
           f"--flops_from={args.flops_from}", f"--deadline={deadline}",
           f"--cache_dir={args.cache_dir}"]
    if args.peak_tflops:
        cmd.append(f"--peak_tflops={args.peak_tflops}")
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", ROOT)
    if which == "jax":  # let XLA use the card, not its default 75%
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    # A compile or step that overruns its estimate is stopped 60 s past the child's deadline.
    killed = []
    timer = threading.Timer(max(1.0, deadline + 60 - time.time()),
                            lambda: (killed.append(True), proc.kill()))
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("@@ "):
                rec = json.loads(line[3:])
                records.append(rec)
                print(f"[{which} {time.strftime('%H:%M:%S')}] {_short(rec)}", flush=True)
            else:
                print(f"[{which}] {line.rstrip()}", flush=True)
        proc.wait()
    finally:
        timer.cancel()
    if killed:
        records.append({"kind": "skip", "impl": which,
                        "why": "child stopped 60 s past its share of the time budget"})
    elif proc.returncode != 0:
        records.append({"kind": "skip", "impl": which,
                        "why": f"child exited with status {proc.returncode}"})


def _short(rec: dict) -> str:
    return json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()})


def _flop(v: float) -> str:
    return f"{v / 1e12:.3f} TFLOP" if v >= 1e11 else f"{v / 1e9:.3f} GFLOP"


def _fmt(v, spec="{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def report(records: list, args, wall_s: float) -> None:
    get = lambda kind, impl: [r for r in records if r["kind"] == kind and r.get("impl") == impl]
    dev_j, dev_t = get("device", "jax"), get("device", "torch")
    model_j, model_t = get("model", "jax"), get("model", "torch")
    flops = next((r for r in records if r["kind"] == "flops"), None)
    device_kind = (dev_j or dev_t or [{"device_kind": "?"}])[0]["device_kind"]
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_kind)
    m = model_section(args.config)

    print("\n## SD U-Net: ours (JAX) against diffusers (PyTorch)\n")
    print(f"- device: {device_kind}; dense bf16 peak used for MFU: "
          f"{_fmt(peak and peak / 1e12, '{:.0f} TFLOP/s') if peak else 'unknown (MFU n/a)'}")
    versions = []
    if dev_j:
        versions.append(f"jax {dev_j[0]['jax']}")
    if dev_t:
        versions.append(f"torch {dev_t[0]['torch']}, diffusers {dev_t[0]['diffusers']}")
    print(f"- versions: {', '.join(versions) or '-'}")
    size = m["latent"]
    print(f"- model: {m['note']}; latents {size}x{size}x4 ({size * 8}x{size * 8} images), "
          f"context {CONTEXT_LEN}x{m['context_dim']}; parameters: ours "
          f"{model_j[0]['params']:,} " if model_j else "- model: ", end="")
    if model_t:
        same = model_j and model_j[0]["params"] == model_t[0]["params"]
        print(f"PyTorch {model_t[0]['params']:,} ({'same' if same else 'DIFFERENT'})", end="")
    print()
    if model_j:
        print(f"- ours: bf16 compute, fp32 master weights, AdamW + EMA, remat {args.remat}; "
              f"init {model_j[0]['init_s']} s")
    if dev_t:
        print(f"- PyTorch: {dev_t[0]['mode']}; attention processor "
              f"{model_t[0]['attention'] if model_t else '?'} (SDPA)")
    if flops:
        fwd = flops["forward_dots_per_image"]
        print(f"- FLOPs: {flops['source']} ({flops['seconds']} s): "
              f"{_flop(flops['per_image'])} per image per training step + "
              f"{_flop(flops['constant'])} per step (optimizer, EMA); used for every row's MFU. "
              f"Check: the forward pass's dots and convolutions (from its jaxpr) "
              f"{_flop(fwd)} per image; "
              f"training / forward = {flops['train_over_forward']:.2f} (about 3 expected)")
    print(f"- training: {args.steps} timed steps after one warm-up; sampling: CFG (guidance "
          f"{GUIDANCE}) at batch 1, a jitted loop of {args.sample_steps} DDIM steps "
          f"(PyTorch: a Python loop), mean of {args.sample_reps} loops after one warm-up\n")

    torch_train = {r["batch"]: r for r in get("train", "torch") if "error" not in r}
    torch_sample = next((r for r in get("sample", "torch") if "error" not in r), None)
    print("| implementation | attention | batch | train img/s | MFU | sample it/s "
          "| ratio vs PyTorch |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for impl, label in (("jax", "ours (JAX/Flax)"), ("torch", "diffusers (PyTorch)")):
        attns = list(dict.fromkeys(r["attention"] for r in records
                                   if r.get("impl") == impl and r["kind"] in ("train", "sample")
                                   and "attention" in r))
        for attn in attns:
            rows = [r for r in records if r.get("impl") == impl and r.get("attention") == attn]
            for r in (x for x in rows if x["kind"] == "sample"):
                if "error" in r:
                    print(f"| {label} | {attn} | 1 (CFG) | | | {r['error']}: {r['detail']} | |")
                    continue
                ratio = (f"{r['it_s'] / torch_sample['it_s']:.2f}x"
                         if impl == "jax" and torch_sample else "")
                print(f"| {label} | {attn} | 1 (CFG) | | | {r['it_s']:.1f} | {ratio} |")
            for r in (x for x in rows if x["kind"] == "train"):
                if "error" in r:
                    print(f"| {label} | {attn} | {r['batch']} | {r['error']} "
                          f"({r['detail']}) | | | |")
                    continue
                f_step = (flops["per_image"] * r["batch"] + flops["constant"]) if flops else None
                rate = f_step / r["step_s"] if f_step else None
                mfu = f"{100 * rate / peak:.1f}%" if (rate and peak) else "n/a"
                if rate:
                    mfu += f" ({_flop(rate)}/s)"
                ref = torch_train.get(r["batch"])
                ratio = f"{r['img_s'] / ref['img_s']:.2f}x" if impl == "jax" and ref else ""
                print(f"| {label} | {attn} | {r['batch']} | {r['img_s']:.2f} | {mfu} | "
                      f"| {ratio} |")
    best = {}
    for r in records:
        if r["kind"] == "train" and "error" not in r:
            key = (r["impl"], r["attention"])
            best[key] = max(best.get(key, 0), r["batch"])
    if best:
        print("\nlargest batch that fit: " + "; ".join(
            f"{'ours' if k[0] == 'jax' else 'PyTorch'} {k[1]}: {v}" for k, v in best.items()))
    skipped = [r for r in records if r["kind"] in ("skip", "note")]
    if skipped:
        print("\nskipped / notes:")
        for r in skipped:
            what = " ".join(str(r[k]) for k in ("impl", "attention", "what", "batch") if k in r)
            print(f"- {what}: {r.get('why') or r.get('text')}")
    print(f"\ntotal wall time {wall_s:.0f} s (budget {args.time_budget_s:.0f} s)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=["sd_v1", "small"], default="sd_v1")
    p.add_argument("--batches", default=None,
                   help="training batches, ascending (default 8,16,24; small: 1,2)")
    p.add_argument("--attention", default="cudnn,xla",
                   help="our U-Net's attention settings to measure (cudnn, xla, chunked, auto)")
    p.add_argument("--torch", action=argparse.BooleanOptionalAction, default=None,
                   help="run diffusers too (default: when torch sees a CUDA GPU)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (10; small 3)")
    p.add_argument("--sample_steps", type=int, default=None,
                   help="DDIM steps in the timed sampling loop (30; small 5); 0 skips sampling")
    p.add_argument("--sample_reps", type=int, default=None, help="timed loops (3; small 1)")
    p.add_argument("--remat", default="none", help="our U-Net's remat policy for training")
    p.add_argument("--time_budget_s", type=float, default=420.0)
    p.add_argument("--torch_reserve_s", type=float, default=None,
                   help="budget kept for the PyTorch side (120 s; small 90 s)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the chip's dense bf16 peak, overriding the table")
    p.add_argument("--flops_from", choices=["lowered", "compiled"], default="lowered",
                   help="cost analysis of the CPU lowering (fast) or of its CPU compile")
    p.add_argument("--cache_dir", default="/tmp/ldm_jax_gpu_sd_cache",
                   help="JAX persistent compilation cache ('' disables)")
    p.add_argument("--only", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    small = args.config == "small"
    args.batches = args.batches or ("1,2" if small else "8,16,24")
    args.batch_list = sorted(int(b) for b in args.batches.split(",") if b)
    args.steps = args.steps or (3 if small else 10)
    args.sample_steps = (5 if small else 30) if args.sample_steps is None else args.sample_steps
    args.sample_reps = args.sample_reps or (1 if small else 3)

    if args.only:
        args.deadline = args.deadline or time.time() + args.time_budget_s
        if args.only == "jax":
            from gpu_sd_jax import jax_child as child
        else:
            from gpu_sd_torch import torch_child as child
        child(args)
        return

    start = time.time()
    deadline = start + args.time_budget_s
    run_torch = args.torch
    records: list = []
    if run_torch is None:
        try:
            import torch
            run_torch = torch.cuda.is_available()
            if not run_torch:
                records.append({"kind": "skip", "impl": "torch",
                                "why": "torch sees no CUDA GPU (pass --torch to run it anyway)"})
        except Exception as e:  # noqa: BLE001
            run_torch = False
            records.append({"kind": "skip", "impl": "torch",
                            "why": f"torch not importable: {first_line(e)}"})
    reserve = args.torch_reserve_s if args.torch_reserve_s is not None else (90 if small else 120)
    run_child("jax", args, deadline - (reserve if run_torch else 0), records)
    if run_torch:
        run_child("torch", args, deadline, records)
    report(records, args, time.time() - start)


if __name__ == "__main__":
    main()
