"""Train-state shardings from the rules in sharding_rules.py (fully sharded data parallelism).

The step stays one `jax.jit`: given these shardings for the state, XLA gathers each split
parameter where a layer needs it and reduce-scatters its gradient, so per-device memory for
parameters, EMA and optimiser state falls with the fsdp size.
"""
from __future__ import annotations

import math
import re

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax import sharding_rules
from ldm_jax.sharding_rules import FSDP, LARGEST


def leaf_path(keys) -> str:
    """A tree path as the rules see it: "params/unet/conv_in/kernel"."""
    parts = []
    for k in keys:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _largest(shape, size: int):
    axes = [i for i, d in enumerate(shape) if d % size == 0]
    if not axes:
        return None
    axis = max(axes, key=lambda i: (shape[i], i))
    return P(*[FSDP if i == axis else None for i in range(len(shape))])


def _fits(spec: P, shape, size: int) -> bool:
    return len(spec) == len(shape) and all(
        entry is None or (entry == FSDP and dim % size == 0) for entry, dim in zip(spec, shape))


def partition_spec(path: str, shape, fsdp_size: int, min_size: int = 0,
                   rules=sharding_rules.RULES) -> P:
    """The PartitionSpec of one leaf (see sharding_rules.py for how rules are read)."""
    if fsdp_size == 1 or not shape or math.prod(shape) < max(min_size, 1):
        return P()
    for pattern, placement in rules:
        if not re.search(pattern, path):
            continue
        if placement == LARGEST:
            spec = _largest(shape, fsdp_size)
            if spec is not None:
                return spec
        elif len(placement) == 0:
            return P()
        elif _fits(placement, shape, fsdp_size):
            return placement
    return P()


def state_specs(abstract_state, fsdp_size: int, min_size: int = 0, rules=sharding_rules.RULES):
    """A tree of PartitionSpecs matching `abstract_state` (leaves need only `.shape`)."""
    return jax.tree_util.tree_map_with_path(
        lambda keys, leaf: partition_spec(leaf_path(keys), tuple(leaf.shape), fsdp_size,
                                          min_size, rules), abstract_state)


def state_shardings(mesh, abstract_state, min_size: int = 0, rules=sharding_rules.RULES):
    size = mesh.shape[FSDP]
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec),
                                  state_specs(abstract_state, size, min_size, rules),
                                  is_leaf=lambda x: isinstance(x, P))
