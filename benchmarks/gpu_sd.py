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
--time_budget_s bounds the whole run: no measurement starts that is not expected to end in time,
and what was skipped is listed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CONTEXT_LEN = 77
GUIDANCE = 7.5
# Dense bf16 peak FLOP/s by device kind (first matching substring wins; lower-case).
PEAK_BF16 = [("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("gh200", 989e12),
             ("a100", 312e12)]
# First guesses (s) for a compile before one has been timed: GPU (SD v1 size) / CPU (small).
FIRST_COMPILE_GUESS = {"train": (100.0, 40.0), "sample": (30.0, 20.0)}


# ----------------------------------------------------------------------------- configuration

def model_section(name: str) -> dict:
    """The U-Net settings both sides are built from, plus the latent size and a note."""
    if name == "small":  # SD v1's layout at a width that runs on a laptop CPU
        return dict(base_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    attention_levels=(0, 1, 2), num_heads=8, transformer_depth=1,
                    use_linear_projection=False, context_dim=64, latent=16,
                    note="small SD-shaped U-Net (widths 32/64/128/128, context 64)")
    try:
        from configs import sd_v1
        c = sd_v1.get_config()
        m = c.model
        return dict(base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                    num_res_blocks=m.num_res_blocks, attention_levels=tuple(m.attention_levels),
                    num_heads=m.num_heads, transformer_depth=m.transformer_depth,
                    use_linear_projection=m.use_linear_projection,
                    context_dim=c.text_encoder.width, latent=64, note="configs/sd_v1.py")
    except ImportError as e:  # ml_collections missing (a bare GPU image): SD v1's own numbers
        return dict(base_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                    attention_levels=(0, 1, 2), num_heads=8, transformer_depth=1,
                    use_linear_projection=False, context_dim=768, latent=64,
                    note=f"SD v1 numbers built in (configs/sd_v1.py not importable: {e})")


def diffusers_config(m: dict) -> dict:
    """UNet2DConditionModel kwargs of the same U-Net (diffusers' defaults are SD v1's
    conventions: flip_sin_to_cos, freq_shift 0, norm_eps 1e-5, downsample_padding 1)."""
    levels = len(m["channel_mult"])
    attn = [lvl in m["attention_levels"] for lvl in range(levels)]
    return dict(sample_size=m["latent"], in_channels=4, out_channels=4,
                block_out_channels=[m["base_channels"] * k for k in m["channel_mult"]],
                down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
                up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D"
                                for a in reversed(attn)],
                layers_per_block=m["num_res_blocks"], norm_num_groups=32,
                attention_head_dim=m["num_heads"],  # diffusers' name for the number of heads
                cross_attention_dim=m["context_dim"],
                transformer_layers_per_block=m["transformer_depth"],
                use_linear_projection=m["use_linear_projection"])


def alphas_cumprod() -> np.ndarray:
    """SD's scaled-linear schedule (betas 0.00085 -> 0.012, 1000 steps)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


def ddim_timesteps(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Descending "leading" timesteps with offset 1 and the alpha-bar of each step's target."""
    ab = alphas_cumprod()
    ts = (np.arange(steps) * (1000 // steps) + 1)[::-1].astype(np.int32)
    prev = np.append(ab[ts[1:]], ab[0]).astype(np.float32)
    return ts, prev


def peak_flops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, value in PEAK_BF16:
        if key in kind:
            return value
    return None


def oom_detail(e: BaseException) -> str | None:
    """The allocation an out-of-memory error names, or None when `e` is not out of memory."""
    text = str(e)
    if not re.search(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory|Out of memory", text, re.I):
        return None
    sizes = re.findall(r"(\d[\d.,]*\s*(?:[KMGT]i?B|bytes))", text)
    return ("asked " + ", ".join(dict.fromkeys(sizes[:3]))) if sizes else text.splitlines()[0][:160]


def emit(record: dict) -> None:
    """Child -> parent: one JSON record per line, prefixed so other output can be told apart."""
    print("@@ " + json.dumps(record), flush=True)


class Budget:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, expected_s: float) -> bool:
        return self.left() > expected_s


# --------------------------------------------------------------------------------- JAX side

def jax_child(args) -> None:
    budget = Budget(args.deadline)
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax.models.initializers import init_from_one_draw
    from ldm_jax.models.unet import UNet

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    emit({"kind": "device", "impl": "jax", "platform": dev.platform,
          "device_kind": dev.device_kind, "jax": jax.__version__})
    m = model_section(args.config)
    size = m["latent"]
    fields = UNet.__dataclass_fields__
    has_attention = "attention" in fields
    remat_is_str = "str" in str(fields["remat"].type)

    def build(dtype, attention: str, remat: str) -> UNet:
        kw = dict(base_channels=m["base_channels"], channel_mult=m["channel_mult"],
                  num_res_blocks=m["num_res_blocks"], attention_levels=m["attention_levels"],
                  num_heads=m["num_heads"], norm_eps=1e-5, downsample_padding=1, in_channels=4,
                  out_channels=4, freq_shift=0.0, flip_sin_to_cos=True,
                  context_dim=m["context_dim"], transformer_depth=m["transformer_depth"],
                  use_linear_projection=m["use_linear_projection"], dtype=dtype)
        if has_attention:
            kw["attention"] = attention
        kw["remat"] = remat if remat_is_str else remat != "none"
        return UNet(**kw)

    # Random weights, as the training stage initialises (jitted, one shared draw); the FLOP
    # count needs only their shapes.
    init_unet = build(jnp.float32, "xla" if has_attention else "auto", "none")
    x1, t1 = jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,), jnp.int32)
    c1 = jnp.zeros((1, CONTEXT_LEN, m["context_dim"]))
    init = jax.jit(lambda k: init_from_one_draw(
        lambda kk: init_unet.init({"params": kk}, x1, t1, context=c1), k)["params"])
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
    ab_table = alphas_cumprod()
    tx = optax.adamw(1e-5, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)

    def make_step(unet, batch):
        def step(state, z0, ctx, key):
            k_t, k_n = jax.random.split(key)
            t = jax.random.randint(k_t, (batch,), 0, 1000)
            noise = jax.random.normal(k_n, z0.shape)
            ab = jnp.asarray(ab_table)[t][:, None, None, None]
            x_t = jnp.sqrt(ab) * z0 + jnp.sqrt(1.0 - ab) * noise

            def loss_fn(p):
                eps = unet.apply({"params": p}, x_t, t, context=ctx)
                return jnp.mean((eps.astype(jnp.float32) - noise) ** 2)
            loss, grads = jax.value_and_grad(loss_fn)(state["params"])
            updates, opt = tx.update(grads, state["opt"], state["params"])
            p = optax.apply_updates(state["params"], updates)
            ema = jax.tree_util.tree_map(lambda e, q: e + 1e-4 * (q - e), state["ema"], p)
            return {"params": p, "ema": ema, "opt": opt}, loss
        return step

    def step_args(batch, sharding=None):
        """Abstract (state, latents, context, key) of a training step at `batch`."""
        abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)  # noqa: E731
        p = jax.tree_util.tree_map(abstract, params)
        opt = jax.tree_util.tree_map(abstract, jax.eval_shape(tx.init, params))
        return ({"params": p, "ema": p, "opt": opt},
                jax.ShapeDtypeStruct((batch, size, size, 4), jnp.float32, sharding=sharding),
                jax.ShapeDtypeStruct((batch, CONTEXT_LEN, m["context_dim"]), jnp.float32,
                                     sharding=sharding),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding))

    # FLOPs: the step with XLA attention and no remat, lowered for the CPU backend.
    try:
        flops = count_flops(jax, build, make_step, step_args, args.flops_from)
        emit({"kind": "flops", **flops})
    except Exception as e:  # noqa: BLE001 - e.g. JAX_PLATFORMS without cpu: MFU n/a
        flops = None
        emit({"kind": "note", "text": f"no FLOP count (MFU n/a): {_first_line(e)}"})

    init_s = None
    if args.batch_list or args.sample_steps > 0:
        start = time.perf_counter()
        params = jax.block_until_ready(init(jax.random.PRNGKey(0)))
        init_s = round(time.perf_counter() - start, 1)
    emit({"kind": "model", "impl": "jax", "params": n_params, "note": m["note"],
          "init_s": init_s, "attention_field": has_attention, "remat": args.remat})

    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(dev.device_kind)
    compile_seen: dict[str, float] = {}
    guess = lambda what: compile_seen.get(what, FIRST_COMPILE_GUESS[what][0 if on_gpu else 1])
    step_seen: dict[str, float] = {}

    attentions = [a for a in args.attention.split(",") if a]
    if not has_attention:
        emit({"kind": "note", "text": "ldm_jax.models.unet.UNet has no `attention` field yet: "
              f"one run with its built-in choice instead of {attentions}"})
        attentions = ["default"]
    for attention in attentions:
        if attention == "cudnn" and not on_gpu:
            emit({"kind": "skip", "impl": "jax", "attention": attention,
                  "why": f"cuDNN attention needs a CUDA GPU (backend is {dev.platform})"})
            continue
        attn = "auto" if attention == "default" else attention
        # Sampling: CFG at batch 1 -> the U-Net at batch 2.
        if args.sample_steps <= 0:
            pass
        elif not budget.allows(guess("sample") + 10):
            emit({"kind": "skip", "impl": "jax", "attention": attention, "what": "sampling",
                  "why": f"time budget ({budget.left():.0f} s left)"})
        else:
            try:
                res, c_s = jax_sampling(jax, jnp, build(jnp.bfloat16, attn, "none"), params,
                                        m, args)
                compile_seen["sample"] = c_s
                emit({"kind": "sample", "impl": "jax", "attention": attention, **res})
            except Exception as e:  # noqa: BLE001 - report and go on
                emit({"kind": "sample", "impl": "jax", "attention": attention,
                      "error": oom_detail(e) and "does not fit",
                      "detail": oom_detail(e) or _first_line(e)})
        # Training, ascending batches until one does not fit.
        for i, batch in enumerate(args.batch_list):
            expected = guess("train") + 2 * step_seen.get("per_image", 0.0) * batch * (
                args.steps + 2)
            if not budget.allows(expected):
                emit({"kind": "skip", "impl": "jax", "attention": attention, "batch": batch,
                      "what": "training", "why": f"time budget ({budget.left():.0f} s left, "
                      f"about {expected:.0f} s needed)"})
                continue
            try:
                res, c_s = jax_training(jax, jnp, build(jnp.bfloat16, attn, args.remat),
                                        make_step, step_args, tx, params, batch, m, args)
                compile_seen["train"] = c_s
                step_seen["per_image"] = res["step_s"] / batch
                if flops:
                    res["flops_per_step"] = flops["per_image"] * batch + flops["constant"]
                    res["tflops"] = round(res["flops_per_step"] / res["step_s"] / 1e12, 3)
                    res["mfu"] = (res["flops_per_step"] / res["step_s"] / peak) if peak else None
                emit({"kind": "train", "impl": "jax", "attention": attention, **res})
            except Exception as e:  # noqa: BLE001 - out of memory or a failed compile
                detail = oom_detail(e)
                emit({"kind": "train", "impl": "jax", "attention": attention, "batch": batch,
                      "error": "does not fit" if detail else "failed",
                      "detail": detail or _first_line(e)})
                if detail:
                    for later in args.batch_list[i + 1:]:
                        emit({"kind": "skip", "impl": "jax", "attention": attention,
                              "batch": later, "what": "training",
                              "why": f"batch {batch} already does not fit"})
                    break


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:240] if lines else ''}"


def count_flops(jax, build, make_step, step_args, how: str) -> dict:
    """FLOPs of a training step at batches 1 and 2 from XLA's cost analysis of the step lowered
    for the CPU backend (XLA attention, no remat), as per-image and constant (optimizer) parts;
    plus the matmul/convolution FLOPs read off the forward pass's jaxpr as a check."""
    import jax.numpy as jnp
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    unet = build(jnp.bfloat16, "xla", "none")
    counts, start, source = {}, time.perf_counter(), None
    for batch in (1, 2):
        lowered = jax.jit(make_step(unet, batch)).lower(*step_args(batch, cpu))
        cost = None
        if how == "lowered":
            try:
                cost, source = lowered.cost_analysis(), "XLA cost analysis of the CPU lowering"
            except Exception:  # noqa: BLE001 - not every jax has it: compile instead
                cost = None
        if cost is None:
            cost = lowered.compile().cost_analysis()
            source = "XLA cost analysis of the CPU compile"
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        counts[batch] = float(cost["flops"])
    per_image = counts[2] - counts[1]
    # The same forward pass's dots and convolutions, counted from its jaxpr.
    state_abs, z, ctx, _ = step_args(1)
    p_abs = state_abs["params"]
    fwd = jax.make_jaxpr(lambda p, x, c: unet.apply(
        {"params": p}, x, jnp.zeros((1,), jnp.int32), context=c))(p_abs, z, ctx)
    fwd_dots = jaxpr_matmul_flops(fwd.jaxpr)
    return {"source": source, "seconds": round(time.perf_counter() - start, 1),
            "per_image": per_image, "constant": counts[1] - per_image,
            "forward_dots_per_image": fwd_dots,
            "train_over_forward": per_image / fwd_dots if fwd_dots else None}


def jaxpr_matmul_flops(jaxpr) -> float:
    """2 x multiply-adds of every dot_general and conv_general_dilated in a jaxpr (recursing
    into sub-jaxprs; a scan's body counted `length` times)."""
    import jax
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            a = eqn.invars[0].aval
            k = int(np.prod([a.shape[d] for d in lc])) if lc else 1
            total += 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * k
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval
            dn = eqn.params["dimension_numbers"]
            out_feat_dim = dn.rhs_spec[0]
            per_out = int(np.prod(rhs.shape)) // rhs.shape[out_feat_dim]
            per_out //= eqn.params["feature_group_count"]
            total += 2.0 * int(np.prod(eqn.outvars[0].aval.shape)) * per_out
        mult = eqn.params.get("length", 1) if name == "scan" else 1
        for value in eqn.params.values():
            subs = value if isinstance(value, (list, tuple)) else [value]
            for sub in subs:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += mult * jaxpr_matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += mult * jaxpr_matmul_flops(sub)
    return total


def jax_sampling(jax, jnp, unet, params, m, args):
    """A jitted loop of DDIM steps with CFG at batch 1 (the U-Net sees batch 2)."""
    size = m["latent"]
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    ts, ab_prev = ddim_timesteps(args.sample_steps)
    ab_table = alphas_cumprod()
    rng = np.random.default_rng(1)
    ctx = jnp.asarray(rng.standard_normal((2, CONTEXT_LEN, m["context_dim"])), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, size, size, 4)), jnp.float32)

    def run(p, x, ctx):
        ts_a, prev_a, ab_a = jnp.asarray(ts), jnp.asarray(ab_prev), jnp.asarray(ab_table)

        def body(i, x):
            t = ts_a[i]
            out = unet.apply({"params": p}, jnp.concatenate([x, x]), jnp.full((2,), t),
                             context=ctx)
            cond, uncond = jnp.split(out.astype(jnp.float32), 2)
            eps = uncond + GUIDANCE * (cond - uncond)
            a, a_prev = ab_a[t], prev_a[i]
            x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
            return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
        return jax.lax.fori_loop(0, len(ts), body, x)

    start = time.perf_counter()
    compiled = jax.jit(run).lower(p16, x, ctx).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(p16, x, ctx))  # warm-up
    reps = max(1, args.sample_reps)
    start = time.perf_counter()
    for _ in range(reps):
        out = compiled(p16, x, ctx)
    out = jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / reps
    finite = bool(jnp.isfinite(out).all())
    return {"steps": args.sample_steps, "loop_s": round(seconds, 4),
            "it_s": args.sample_steps / seconds, "compile_s": round(compile_s, 1),
            "finite": finite}, compile_s


def jax_training(jax, jnp, unet, make_step, step_args, tx, params, batch, m, args):
    size = m["latent"]
    rng = np.random.default_rng(0)
    z0 = jnp.asarray(rng.standard_normal((batch, size, size, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((batch, CONTEXT_LEN, m["context_dim"])), jnp.float32)
    fn = jax.jit(make_step(unet, batch), donate_argnums=(0,))
    start = time.perf_counter()
    compiled = fn.lower(*step_args(batch)[:1], z0, ctx, jax.random.PRNGKey(0)).compile()
    compile_s = time.perf_counter() - start
    mem = None
    try:
        ma = compiled.memory_analysis()
        mem = (ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
               - ma.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        pass
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    state = {"params": copy(params), "ema": copy(params), "opt": jax.jit(tx.init)(params)}
    try:
        state, loss = compiled(state, z0, ctx, jax.random.PRNGKey(0))  # warm-up
        jax.block_until_ready(loss)
        start = time.perf_counter()
        for i in range(args.steps):
            state, loss = compiled(state, z0, ctx, jax.random.PRNGKey(i + 1))
        loss = float(jax.block_until_ready(loss))
        seconds = (time.perf_counter() - start) / args.steps
    finally:
        del state
    return {"batch": batch, "step_s": round(seconds, 4), "img_s": batch / seconds,
            "compile_s": round(compile_s, 1), "loss": round(loss, 4),
            "xla_bytes": mem}, compile_s


# ----------------------------------------------------------------------------- PyTorch side

def torch_child(args) -> None:
    budget = Budget(args.deadline)
    try:
        import torch
        import torch.nn.functional as F
        from diffusers import UNet2DConditionModel
    except Exception as e:  # noqa: BLE001 - report why and stop this side
        emit({"kind": "skip", "impl": "torch", "why": f"torch/diffusers not importable: "
              f"{_first_line(e)}"})
        return
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    m = model_section(args.config)
    size = m["latent"]
    emit({"kind": "device", "impl": "torch", "platform": dev.type,
          "device_kind": torch.cuda.get_device_name(0) if cuda else "cpu",
          "torch": torch.__version__, "diffusers": diffusers.__version__,
          "mode": ("train: bf16 autocast, fp32 weights, fused AdamW; sample: bf16 weights"
                   if cuda else "fp32 throughout (bf16 is slow on this CPU)")})
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(dev):
        model = UNet2DConditionModel(**diffusers_config(m))
    n_params = sum(p.numel() for p in model.parameters())
    emit({"kind": "model", "impl": "torch", "params": n_params,
          "init_s": round(time.perf_counter() - start, 1),
          "attention": type(model.attn_processors[next(iter(model.attn_processors))]).__name__})
    ab = torch.from_numpy(alphas_cumprod()).to(dev)

    # Sampling: a copy in bf16 (fp32 on the CPU), CFG at batch 1.
    if args.sample_steps > 0 and budget.allows(20):
        import copy
        smodel = copy.deepcopy(model).to(torch.bfloat16 if cuda else torch.float32).eval()
        sdt = next(smodel.parameters()).dtype
        ts, ab_prev = ddim_timesteps(args.sample_steps)
        g = torch.Generator(device="cpu").manual_seed(1)
        ctx = torch.randn(2, CONTEXT_LEN, m["context_dim"], generator=g).to(dev, sdt)
        x0 = torch.randn(1, 4, size, size, generator=g).to(dev)

        def sample():
            x = x0
            with torch.inference_mode():
                for i, t in enumerate(ts):
                    tt = torch.full((2,), int(t), device=dev)
                    out = smodel(torch.cat([x, x]).to(sdt), tt, encoder_hidden_states=ctx).sample
                    cond, uncond = out.float().chunk(2)
                    eps = uncond + GUIDANCE * (cond - uncond)
                    a, a_prev = ab[int(t)], float(ab_prev[i])
                    xz = (x - (1 - a).sqrt() * eps) / a.sqrt()
                    x = a_prev ** 0.5 * xz + (1 - a_prev) ** 0.5 * eps
            return x
        try:
            sample()  # warm-up
            sync()
            reps = max(1, args.sample_reps)
            start = time.perf_counter()
            for _ in range(reps):
                out = sample()
            sync()
            seconds = (time.perf_counter() - start) / reps
            emit({"kind": "sample", "impl": "torch", "attention": "sdpa",
                  "steps": args.sample_steps, "loop_s": round(seconds, 4),
                  "it_s": args.sample_steps / seconds, "dtype": str(sdt).split(".")[-1],
                  "finite": bool(torch.isfinite(out).all())})
        except Exception as e:  # noqa: BLE001
            emit({"kind": "sample", "impl": "torch", "attention": "sdpa",
                  "error": "failed", "detail": _first_line(e)})
        del smodel
        if cuda:
            torch.cuda.empty_cache()
    elif args.sample_steps > 0:
        emit({"kind": "skip", "impl": "torch", "what": "sampling", "why": "time budget"})

    # Training: fp32 weights, bf16 autocast on the GPU, AdamW (fused on the GPU), EMA.
    model.train()
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            **({"fused": True} if cuda else {}))
    ema = [p.detach().clone() for p in params]
    per_image = None
    for i, batch in enumerate(args.batch_list):
        expected = 10 + (per_image or 0.0) * batch * (args.steps + 3)
        if not budget.allows(expected):
            emit({"kind": "skip", "impl": "torch", "attention": "sdpa", "batch": batch,
                  "what": "training", "why": f"time budget ({budget.left():.0f} s left)"})
            continue
        g = torch.Generator(device="cpu").manual_seed(0)
        z0 = torch.randn(batch, 4, size, size, generator=g).to(dev)
        ctx = torch.randn(batch, CONTEXT_LEN, m["context_dim"], generator=g).to(dev)

        def step():
            opt.zero_grad(set_to_none=True)
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(z0)
            a = ab[t][:, None, None, None]
            x_t = a.sqrt() * z0 + (1 - a).sqrt() * noise
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
                out = model(x_t, t, encoder_hidden_states=ctx).sample
            loss = F.mse_loss(out.float(), noise)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_lerp_(ema, params, 1e-4)
            return loss.detach()
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            step()  # warm-up (allocates the optimizer state on the first batch)
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step()
            sync()
            seconds = (time.perf_counter() - start) / args.steps
            per_image = seconds / batch
            emit({"kind": "train", "impl": "torch", "attention": "sdpa", "batch": batch,
                  "step_s": round(seconds, 4), "img_s": batch / seconds,
                  "loss": round(loss.item(), 4),
                  "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None})
        except Exception as e:  # noqa: BLE001 - out of memory: report, stop growing
            detail = oom_detail(e)
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
            emit({"kind": "train", "impl": "torch", "attention": "sdpa", "batch": batch,
                  "error": "does not fit" if detail else "failed",
                  "detail": detail or _first_line(e)})
            if detail:
                for later in args.batch_list[i + 1:]:
                    emit({"kind": "skip", "impl": "torch", "attention": "sdpa", "batch": later,
                          "what": "training", "why": f"batch {batch} already does not fit"})
                break


# ------------------------------------------------------------------------------------ parent

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
        (jax_child if args.only == "jax" else torch_child)(args)
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
                            "why": f"torch not importable: {_first_line(e)}"})
    reserve = args.torch_reserve_s if args.torch_reserve_s is not None else (90 if small else 120)
    run_child("jax", args, deadline - (reserve if run_torch else 0), records)
    if run_torch:
        run_child("torch", args, deadline, records)
    report(records, args, time.time() - start)


if __name__ == "__main__":
    main()
