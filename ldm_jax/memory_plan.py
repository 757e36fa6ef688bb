"""Per-device memory of a training run, known before it runs: the train state's bytes from
its shardings (sharding_rules.py) and the compiled step's from XLA's memory analysis.

The step is the loop's own (training/loop.py jit_step), lowered with abstract inputs, so the
figures are those of the program `train.py` would run on this mesh.
"""
from __future__ import annotations

import math

import jax
import numpy as np

from ldm_jax import config_utils, parallel
from ldm_jax.checkpoint import abstract_with_sharding
from ldm_jax.config_checks import ConfigError

STATE_PARTS = ("params", "ema_params", "opt_state")


def _shard_bytes(abstract, shardings) -> int:
    """Bytes one device holds of `abstract` placed with `shardings` (the first device's; the
    rules give every device an equal share)."""
    leaves = jax.tree_util.tree_leaves(abstract)
    specs = jax.tree_util.tree_leaves(shardings)
    return sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a, s in zip(leaves, specs))


def _bytes(tree) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(tree))


def plan(config, devices=None, compile_step: bool = True) -> dict:
    """{"mesh": (data, fsdp), "devices", "per_device": {part: bytes}, "whole": {part: bytes},
    "xla": {argument, output, alias, temp} or None, "notes": [...]}."""
    from ldm_jax.training.loop import jit_step
    stage = config_utils.stage_module(config.stage)
    stage.validate(config)
    if not hasattr(stage, "abstract_run"):
        raise ConfigError(f"memory planning is not available for the {config.stage!r} stage")
    mesh = parallel.make_mesh(devices, config.parallel)
    t = config.training
    config_utils.check_batch_divides(t.batch_size, mesh.devices.size, 1,
                                     config.optimizer.grad_accum_steps)
    run, batch, frozen, notes = stage.abstract_run(config, mesh)
    abstract = jax.eval_shape(run.init, jax.random.PRNGKey(0))
    sharding = parallel.state_sharding(mesh, abstract, config.parallel)
    replicated = parallel.replicated(mesh)
    per_device, whole = {}, {}
    for part in STATE_PARTS:
        per_device[part] = _shard_bytes(getattr(abstract, part), getattr(sharding, part))
        whole[part] = _bytes(getattr(abstract, part))
    rest = abstract.replace(**{p: None for p in STATE_PARTS})
    per_device["other state"] = _shard_bytes(rest, parallel.state_sharding(mesh, rest,
                                                                           config.parallel))
    whole["other state"] = _bytes(rest)
    per_device["frozen inputs"] = whole["frozen inputs"] = _bytes(frozen)
    per_device["batch"] = _bytes(batch) // mesh.devices.size
    whole["batch"] = _bytes(batch)
    xla = None
    if compile_step:
        n = mesh.devices.size
        flags = jax.ShapeDtypeStruct((n,), np.int32, sharding=parallel.batch_sharding(mesh))
        args = (abstract_with_sharding(abstract, sharding),
                abstract_with_sharding(batch, jax.tree_util.tree_map(
                    lambda _: parallel.batch_sharding(mesh), batch)),
                abstract_with_sharding(frozen, jax.tree_util.tree_map(lambda _: replicated,
                                                                      frozen)),
                flags)
        step = jit_step(run, mesh, sharding, t.skip_nonfinite_steps)
        analysis = step.lower(*args).compile().memory_analysis()
        xla = {"argument": analysis.argument_size_in_bytes,
               "output": analysis.output_size_in_bytes,
               "alias": analysis.alias_size_in_bytes,
               "temp": analysis.temp_size_in_bytes}
        per_device["flags"] = 4
    return {"mesh": tuple(mesh.devices.shape), "devices": mesh.devices.size,
            "platform": mesh.devices.flat[0].platform, "per_device": per_device,
            "whole": whole, "xla": xla, "notes": notes}


def peak_bytes(result: dict) -> int | None:
    """Arguments + outputs not written in place of a donated argument + temporaries."""
    x = result["xla"]
    return None if x is None else x["argument"] + x["output"] - x["alias"] + x["temp"]


def _gib(n: int) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def report(result: dict, config) -> str:
    data, fsdp = result["mesh"]
    pd, whole = result["per_device"], result["whole"]
    lines = [f"{config.stage} step, global batch {config.training.batch_size}, compute "
             f"{config.training.compute_dtype}, mesh data={data} x fsdp={fsdp} "
             f"({result['devices']} {result['platform']} devices)",
             f"{'':26}{'per device':>14}{'whole run':>16}"]
    for part in (*STATE_PARTS, "other state", "frozen inputs", "batch"):
        name = {"ema_params": "EMA", "opt_state": "optimiser state",
                "params": "parameters"}.get(part, part)
        lines.append(f"{name:26}{_gib(pd[part]):>14}{_gib(whole[part]):>16}")
    if result["xla"] is not None:
        x = result["xla"]
        lines += [f"{'XLA: arguments':26}{_gib(x['argument']):>14}",
                  f"{'XLA: step temporaries':26}{_gib(x['temp']):>14}",
                  f"{'XLA: outputs not aliased':26}{_gib(x['output'] - x['alias']):>14}",
                  f"{'peak (estimate)':26}{_gib(peak_bytes(result)):>14}"]
        if result["platform"] == "cpu":
            lines.append("(temporaries from the CPU compiler; a GPU or TPU compile of the same "
                         "step differs in fusion and layout)")
    return "\n".join(lines + result["notes"])
