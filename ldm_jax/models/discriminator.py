"""The PatchGAN discriminator of pix2pix, taming-transformers and latent-diffusion (NHWC).

`NLayerDiscriminator` (n_layers=3, ndf=64) is

    conv 4x4 s2 (bias)                  -> LeakyReLU(0.2)         taming main.0, main.1
    for n in 1..n_layers-1:
      conv 4x4 s2, ndf*min(2^n, 8)      -> norm -> LeakyReLU(0.2) main.2..4, main.5..7
    conv 4x4 s1, ndf*min(2^n_layers, 8) -> norm -> LeakyReLU(0.2) main.8..10
    conv 4x4 s1 to 1 channel (bias)                               main.11

with padding 1 on every side of every conv, so a 64x64 input gives 6x6 logits
(64 -> 32 -> 16 -> 8 -> 7 -> 6) and a 256x256 input 30x30. `torch_key_map` gives the
PyTorch state-dict name of every variable.

Norms (the `norm` field):
  "batch" (default): `BatchNorm` with PyTorch's semantics, see below. The middle convs have no
          bias, as in taming (a bias before BatchNorm is cancelled by the mean).
  "act":  `ActNorm`, taming's data-dependently initialised affine layer. taming keeps the conv
          biases in this case (its `use_bias = norm_layer != BatchNorm2d`), and so do we.

Initialisation (taming's `weights_init`): conv kernels N(0, 0.02); BatchNorm scale N(1, 0.02),
bias 0. `weights_init` does not touch conv biases, so they keep PyTorch's default
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = 16 * in_channels; we reproduce that too.
All these values are slices of one normal draw (uniforms through the normal CDF): XLA on CPU
compiles one RNG kernel per draw, and a dozen of them took ~8 s to compile. Run `init` under
`jax.jit` (eager init compiles every op on its own).

How the reference uses it (latent-diffusion `LPIPSWithDiscriminator`, taming
`VQLPIPSWithDiscriminator`): the discriminator is always in train mode during training, real and
fake images go through it in *separate* calls (each normalised by its own batch statistics, and
each call updating the running statistics), and the generator step also calls it on the
reconstructions in train mode. Concatenating real and fake into one call is not equivalent.

Data parallelism: under `jax.jit` with the batch sharded over a mesh, `jnp.mean` over the batch
axis is the mean over the *global* batch (XLA inserts the all-reduce), so BatchNorm and ActNorm
statistics are global-batch statistics with no `axis_name`. `axis_name` is only for
`shard_map`/`pmap` code, where each program sees its local shard (BatchNorm only; ActNorm's
one-off data init is meant for `init` under plain jit).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NORMS = ("batch", "act")


def _normal(mean: float, std: float):
    def init(key, shape, dtype=jnp.float32):
        return (mean + std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return init


def _given(value):
    """An initialiser that returns a precomputed array (the key is ignored)."""
    def init(key, shape, dtype=jnp.float32):
        if tuple(shape) != value.shape:
            raise RuntimeError(f"discriminator init: shape {shape} != planned {value.shape}")
        return value.astype(dtype)
    return init


def _stats_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


class BatchNorm(nn.Module):
    """BatchNorm2d with PyTorch's semantics (NHWC, statistics over all axes but the last).

    train=True: normalise with the batch mean and the *biased* batch variance, and (outside
    `init`) update the running statistics in `batch_stats` as PyTorch does:
        mean_run <- momentum * mean_run + (1 - momentum) * mean_batch
        var_run  <- momentum * var_run  + (1 - momentum) * var_batch * n / (n - 1)
    with n = elements per channel. The *unbiased* variance in the running estimate is where
    `flax.linen.BatchNorm` differs (it stores the biased one), hence this module.
    `momentum` follows flax's convention: PyTorch's momentum=0.1 is momentum=0.9 here.
    train=False: normalise with the running statistics.
    Statistics are float32 (or wider) whatever the compute dtype.
    """
    momentum: float = 0.9
    epsilon: float = 1e-5
    axis_name: str | None = None
    dtype: Dtype = jnp.float32
    scale_init: Callable = _normal(1.0, 0.02)

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        sdt = _stats_dtype(x)
        xf = x.astype(sdt)
        if train:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(xf, axis=axes)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
                n = n * jax.lax.psum(1, self.axis_name)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)  # two-pass: no cancellation
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                m = self.momentum
                unbiased = var * (n / jnp.maximum(n - 1, 1))
                ra_mean.value = (m * ra_mean.value + (1 - m) * mean).astype(jnp.float32)
                ra_var.value = (m * ra_var.value + (1 - m) * unbiased).astype(jnp.float32)
        else:
            mean, var = ra_mean.value.astype(sdt), ra_var.value.astype(sdt)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class ActNorm(nn.Module):
    """taming's ActNorm: y = scale * (x + loc), per channel, data-dependently initialised.

    On its first training batch taming sets loc = -mean and scale = 1 / (std + 1e-6) per channel
    (std unbiased, over batch and space) and raises the `initialized` buffer. Flax cannot write
    params from inside a plain `apply`, so here the data-dependent initialisation happens
    whenever the `params` collection is mutable, `train=True` and the flag
    (`batch_stats/initialized`) is 0:
      - in `module.init(rng, real_batch, train=True)`: the natural place; pass real images, not
        zeros (a constant input gives std 0 and scale 1e6);
      - or later with `initialize_actnorm(module, variables, batch)`.
    In a train step (`mutable=["batch_stats"]`, params immutable) the layer is a plain affine
    map whatever the flag, like taming's after its first batch. As in taming, the first
    forward's output uses the data statistics while gradients flow to `loc`/`scale`.
    """
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        c = x.shape[-1]
        loc = self.param("loc", nn.initializers.zeros, (c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        flag = self.variable("batch_stats", "initialized", lambda: jnp.zeros((), jnp.int32))
        sdt = _stats_dtype(x)
        xf = x.astype(sdt)
        loc, scale = loc.astype(sdt), scale.astype(sdt)
        if (train and self.is_mutable_collection("params")
                and self.is_mutable_collection("batch_stats")):
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(xf, axis=axes)
            std = jnp.sqrt(jnp.sum(jnp.square(xf - mean), axis=axes) / max(n - 1, 1))
            need = flag.value == 0
            new_loc = jnp.where(need, -mean, loc)
            new_scale = jnp.where(need, 1.0 / (std + 1e-6), scale)
            # Values of the data init, gradients of the parameters (straight-through).
            loc = loc + jax.lax.stop_gradient(new_loc - loc)
            scale = scale + jax.lax.stop_gradient(new_scale - scale)
            self.put_variable("params", "loc", jax.lax.stop_gradient(new_loc).astype(jnp.float32))
            self.put_variable("params", "scale",
                              jax.lax.stop_gradient(new_scale).astype(jnp.float32))
            flag.value = jnp.ones((), jnp.int32)
        return (scale * (xf + loc)).astype(self.dtype)


def initialize_actnorm(module: "NLayerDiscriminator", variables, x):
    """Run ActNorm's data-dependent initialisation on batch `x` (NHWC); return new variables.

    Resets every `initialized` flag first, so it also re-initialises. For norm="batch" the
    variables come back unchanged.
    """
    if module.norm != "act":
        return variables
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if getattr(path[-1], "key", None) == "initialized" else v,
        variables["batch_stats"])
    _, new = module.apply({**variables, "batch_stats": stats}, x, train=True,
                          mutable=["params", "batch_stats"])
    return {**variables, **new}


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator: images (B, H, W, C) -> logits (B, H', W', 1); see module doc.

    Usage in a train step (norm="batch"):
        variables = disc.init(rng, x_real, train=True)   # {"params", "batch_stats"}
        logits, upd = disc.apply(variables, x, train=True, mutable=["batch_stats"])
    """
    ndf: int = 64
    n_layers: int = 3
    norm: str = "batch"
    bn_momentum: float = 0.9  # flax convention; PyTorch's momentum 0.1
    axis_name: str | None = None
    dtype: Dtype = jnp.float32

    def _plan(self, in_channels):
        """[(name, in, out, stride, has_bias, norm_name or None)] for every conv."""
        mid_bias = self.norm != "batch"
        plan = [("conv_in", in_channels, self.ndf, 2, True, None)]
        cin = self.ndf
        for n in range(1, self.n_layers + 1):
            cout = self.ndf * min(2 ** n, 8)
            plan.append((f"conv{n}", cin, cout, 2 if n < self.n_layers else 1, mid_bias,
                         f"norm{n}"))
            cin = cout
        plan.append(("conv_out", cin, 1, 1, True, None))
        return plan

    def _initial_values(self, plan):
        """All random initial values from ONE normal draw (XLA on CPU compiles one RNG kernel
        per draw, and a dozen of them take longer to compile than the whole forward pass):
        kernels 0.02 z, BatchNorm scales 1 + 0.02 z, conv biases U(-b, b) = b (2 Phi(z) - 1)
        with b = 1/sqrt(fan_in) (PyTorch's default, which taming's weights_init keeps)."""
        shapes = []
        for name, cin, cout, _, has_bias, norm_name in plan:
            shapes.append((f"{name}/kernel", (4, 4, cin, cout)))
            if has_bias:
                shapes.append((f"{name}/bias", (cout,)))
            if norm_name and self.norm == "batch":
                shapes.append((f"{norm_name}/scale", (cout,)))
        total = sum(math.prod(s) for _, s in shapes)
        z = jax.random.normal(self.make_rng("params"), (total,), jnp.float32)
        z = jax.lax.optimization_barrier(z)  # keep XLA from duplicating the RNG into each slice
        values, offset = {}, 0
        fan_in = {name: 16 * cin for name, cin, *_ in plan}
        for key, shape in shapes:
            part = z[offset:offset + math.prod(shape)].reshape(shape)
            offset += math.prod(shape)
            layer, kind = key.split("/")
            if kind == "kernel":
                values[key] = 0.02 * part
            elif kind == "scale":
                values[key] = 1.0 + 0.02 * part
            else:
                bound = 1.0 / math.sqrt(fan_in[layer])
                values[key] = bound * (2.0 * jax.scipy.special.ndtr(part) - 1.0)
        return values

    @nn.compact
    def __call__(self, x, train: bool = True):
        if self.norm not in NORMS:
            raise ValueError(f"NLayerDiscriminator: unknown norm {self.norm!r}; expected one of {NORMS}")
        if x.ndim != 4:
            raise ValueError(f"NLayerDiscriminator expects NHWC images, got shape {x.shape}")
        plan = self._plan(x.shape[-1])
        init = self._initial_values(plan) if self.is_initializing() else {}
        given = lambda key, default: _given(init[key]) if key in init else default
        h = x.astype(self.dtype)
        for name, cin, cout, stride, has_bias, norm_name in plan:
            h = nn.Conv(cout, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        use_bias=has_bias, dtype=self.dtype, param_dtype=jnp.float32,
                        kernel_init=given(f"{name}/kernel", _normal(0.0, 0.02)),
                        bias_init=given(f"{name}/bias", nn.initializers.zeros), name=name)(h)
            if norm_name is not None:
                if self.norm == "batch":
                    h = BatchNorm(momentum=self.bn_momentum, axis_name=self.axis_name,
                                  dtype=self.dtype, name=norm_name,
                                  scale_init=given(f"{norm_name}/scale", _normal(1.0, 0.02)))(
                                      h, train)
                else:
                    h = ActNorm(dtype=self.dtype, name=norm_name)(h, train)
            if name != "conv_out":
                h = nn.leaky_relu(h, 0.2)
        return h


def torch_key_map(n_layers: int = 3, norm: str = "batch") -> dict:
    """{flax variable path (collection, module, name): taming state-dict key}.

    Conv kernels are (kh, kw, in, out) here and (out, in, kh, kw) in PyTorch. ActNorm's torch
    loc/scale have shape (1, C, 1, 1). BatchNorm's `num_batches_tracked` has no counterpart
    (it only matters for momentum=None).
    """
    keys = {("params", "conv_in", "kernel"): "main.0.weight",
            ("params", "conv_in", "bias"): "main.0.bias"}
    i = 2
    for n in range(1, n_layers + 1):
        keys[("params", f"conv{n}", "kernel")] = f"main.{i}.weight"
        if norm == "batch":
            keys[("params", f"norm{n}", "scale")] = f"main.{i + 1}.weight"
            keys[("params", f"norm{n}", "bias")] = f"main.{i + 1}.bias"
            keys[("batch_stats", f"norm{n}", "mean")] = f"main.{i + 1}.running_mean"
            keys[("batch_stats", f"norm{n}", "var")] = f"main.{i + 1}.running_var"
        else:
            keys[("params", f"conv{n}", "bias")] = f"main.{i}.bias"
            keys[("params", f"norm{n}", "loc")] = f"main.{i + 1}.loc"
            keys[("params", f"norm{n}", "scale")] = f"main.{i + 1}.scale"
            keys[("batch_stats", f"norm{n}", "initialized")] = f"main.{i + 1}.initialized"
        i += 3
    keys[("params", "conv_out", "kernel")] = f"main.{i}.weight"
    keys[("params", "conv_out", "bias")] = f"main.{i}.bias"
    return keys
