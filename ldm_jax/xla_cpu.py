"""XLA flags for fast convolutional U-Nets on CPUs without AVX-512.

jaxlib 0.10's CPU backend hands convolutions to YNNPACK fusions. On a 2-core AVX2 host these
made the DDPM CIFAR-10 U-Net's train step 1.55x PyTorch's time, against 1.03x with XLA's own
kernels (sampling step 1.19x against 0.72x); one kernel-gradient convolution (3x3, 32x32x64,
batch 32) ran at ~3 GFLOP/s with them and ~60 GFLOP/s without. On an AVX-512 host YNNPACK was
the faster choice (the step was 10-15% slower without it), so it is only turned off where
the CPU lacks AVX-512. The flag affects only the CPU backend and must be in XLA_FLAGS before
JAX creates its first backend.
"""
from __future__ import annotations

import os

_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def cpu_has_avx512(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def use_fast_cpu_flags() -> None:
    """Turn YNNPACK fusions off on CPUs without AVX-512, unless XLA_FLAGS already sets them."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _YNN_FLAG not in flags and not cpu_has_avx512():
        os.environ["XLA_FLAGS"] = f"{flags} --{_YNN_FLAG}=".strip()
