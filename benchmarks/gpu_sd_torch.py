"""The PyTorch child of benchmarks/gpu_sd.py (`--only=torch`): diffusers' UNet2DConditionModel
with the same config, its CFG sampling loop and its training step."""
from __future__ import annotations

import time

from gpu_sd_common import (CONTEXT_LEN, GUIDANCE, Budget, alphas_cumprod, ddim_timesteps,
                           diffusers_config, emit, first_line, model_section, oom_detail)


def torch_child(args) -> None:
    budget = Budget(args.deadline)
    try:
        import torch
        import torch.nn.functional as F
        from diffusers import UNet2DConditionModel
    except Exception as e:  # noqa: BLE001 - report why and stop this side
        emit({"kind": "skip", "impl": "torch", "why": f"torch/diffusers not importable: "
              f"{first_line(e)}"})
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
                  "error": "failed", "detail": first_line(e)})
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
                  "detail": detail or first_line(e)})
            if detail:
                for later in args.batch_list[i + 1:]:
                    emit({"kind": "skip", "impl": "torch", "attention": "sdpa", "batch": later,
                          "what": "training", "why": f"batch {batch} already does not fit"})
                break
