"""python -m ldm_jax.memory --config=configs/sd_v1.py [--devices=N] [--config.parallel.fsdp=K]

Prints the per-device bytes of a run's parameters, EMA, optimiser state, frozen inputs and
batch, and the compiled step's arguments and temporaries (XLA's memory analysis), without
data, weights or a training step. On a CPU machine --devices=N plans for N devices by
running XLA's CPU backend with N virtual devices.
"""
from __future__ import annotations

import os
import sys


def _virtual_devices(argv) -> None:
    """--devices=N must reach XLA before JAX starts."""
    for arg in argv:
        if arg.startswith("--devices="):
            n = arg.split("=", 1)[1]
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + f" --xla_force_host_platform_device_count={n}").strip()


def main(argv=None):
    argv = sys.argv if argv is None else argv
    _virtual_devices(argv)
    from absl import app, flags
    from ml_collections import config_flags

    from ldm_jax import cli
    config = config_flags.DEFINE_config_file("config", None, "The run's config.")
    devices = flags.DEFINE_integer("devices", 0, "Plan for this many devices (default: all "
                                   "present; on a CPU machine, virtual devices).")
    no_compile = flags.DEFINE_bool("no_compile", False, "Only the state's bytes (no XLA "
                                   "compile of the step).")

    def run(_):
        import jax

        from ldm_jax import memory_plan
        if config.value is None:
            cli.fail("--config=configs/NAME.py is required")
        present = jax.devices()
        if devices.value > len(present):
            cli.fail(f"--devices={devices.value}, but {len(present)} {present[0].platform} "
                     "devices are present; virtual devices exist on CPU only")
        chosen = present[:devices.value] if devices.value else None
        with cli.readable_errors():
            result = memory_plan.plan(config.value, chosen, not no_compile.value)
            print(memory_plan.report(result, config.value))

    cli.use_fast_cpu_flags()
    app.run(run, argv)


if __name__ == "__main__":
    main()
