"""Which attention kernel a call runs: `select_attention` decides from the platform, the
compute dtype, the head size and whether a key mask is given, so the table is testable
without the hardware.

  xla      jax.nn.dot_product_attention(implementation="xla"): any platform, dtype and mask.
  cudnn    cuDNN's fused flash attention on NVIDIA GPUs: bf16/fp16 only, head size a
           multiple of 8 up to 128 (256 from Hopper on). It takes a key mask only as a bias
           of full (T, S) size, and in training only for even lengths (77 CLIP tokens are
           not), so masked calls are not sent there.
  chunked  our blocked kernel (attention_kernels.chunked_attention): what the CPU runs best.
  auto     chunked on CPU; cudnn where the call fits it; xla otherwise.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def select_attention(backend: str, dtype, head_dim: int, has_mask: bool, requested: str,
                     max_head_dim: int = 128) -> str:
    """The implementation ("xla" | "cudnn" | "chunked") for one call. `backend` is
    `jax.default_backend()` ("cpu", "gpu", "tpu"; "cuda" is taken as "gpu") and
    `max_head_dim` the largest head cuDNN takes on this GPU. ValueError for an explicit
    "cudnn" the call cannot run."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {requested!r} is not one of "
                         f"{list(IMPLEMENTATIONS)}; use 'auto' to let the platform choose")
    if requested in ("xla", "chunked"):
        return requested
    why_not = _cudnn_refusal(backend, dtype, head_dim, has_mask, max_head_dim)
    if requested == "cudnn":
        if why_not:
            raise ValueError(f"attention='cudnn' cannot run here: {why_not}; use "
                             "attention='auto' (picks cudnn where it can) or 'xla'")
        return "cudnn"
    if backend == "cpu":
        return "chunked"
    return "xla" if why_not else "cudnn"


def _cudnn_refusal(backend, dtype, head_dim, has_mask, max_head_dim) -> str | None:
    """Why cuDNN's fused attention cannot take this call, or None if it can."""
    if backend not in ("gpu", "cuda"):
        return f"cuDNN needs an NVIDIA GPU and the platform is {backend}"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return (f"cuDNN takes bfloat16 or float16 and the compute dtype is "
                f"{jnp.dtype(dtype).name} (set training.compute_dtype=bfloat16)")
    if head_dim % 8 or head_dim > max_head_dim:
        return (f"cuDNN takes heads of a multiple of 8 channels up to {max_head_dim}, "
                f"and these have {head_dim}")
    if has_mask:
        return "cuDNN takes a key padding mask only as a full-size bias, which is not built"
    return None


@functools.lru_cache(maxsize=None)
def platform() -> tuple[str, int]:
    """(backend, the largest head cuDNN takes here) of the default device, looked up once."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend, 0
    device = jax.devices()[0]
    if "cuda" not in getattr(device.client, "platform_version", "cuda").lower():
        return "rocm", 0  # a GPU without cuDNN
    major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
    return "gpu", 256 if major >= 9 else 128  # Hopper on: 256 (cuDNN's own check)


def choose(dtype, head_dim: int, has_mask: bool, requested: str) -> str:
    """`select_attention` for the default device."""
    backend, max_head_dim = platform()
    return select_attention(backend, dtype, head_dim, has_mask, requested,
                            max_head_dim=max_head_dim or 128)
