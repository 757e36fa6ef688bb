"""The JAX child of benchmarks/gpu_sd.py (`--only=jax`): our U-Net's training step and CFG
sampling loop for each attention setting, and the step's FLOPs for MFU."""
from __future__ import annotations

import time

import numpy as np

from gpu_sd_common import (CONTEXT_LEN, GUIDANCE, Budget, alphas_cumprod, ddim_timesteps, emit,
                           first_line, model_section, oom_detail, peak_flops)

# First guesses (s) for a compile before one has been timed: GPU (SD v1 size) / CPU (small).
FIRST_COMPILE_GUESS = {"train": (100.0, 40.0), "sample": (30.0, 20.0)}


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
        emit({"kind": "note", "text": f"no FLOP count (MFU n/a): {first_line(e)}"})

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
                      "detail": oom_detail(e) or first_line(e)})
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
                      "detail": detail or first_line(e)})
                if detail:
                    for later in args.batch_list[i + 1:]:
                        emit({"kind": "skip", "impl": "jax", "attention": attention,
                              "batch": later, "what": "training",
                              "why": f"batch {batch} already does not fit"})
                    break


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
