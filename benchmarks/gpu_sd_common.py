"""Helpers that benchmarks/gpu_sd.py and its two children (gpu_sd_jax.py, gpu_sd_torch.py)
share: the U-Net settings both sides are built from, SD's noise schedule, the chips' bf16 peaks,
out-of-memory detection, the child -> parent record format and the time budget."""
from __future__ import annotations

import json
import os
import re
import sys
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


def first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:240] if lines else ''}"
