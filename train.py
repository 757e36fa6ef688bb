"""Train a model: python train.py --config=configs/ddpm_shapes.py --workdir=DIR [--config.a.b=v ...]

Re-running the same command resumes from the latest checkpoint in DIR.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or set
LDM_JAX_DISTRIBUTED=1 where JAX can detect the cluster (SLURM, TPU pods).
"""
import sys

from absl import flags
from ml_collections import config_flags

from ldm_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
cli.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options are written --name=value")
    if _CONFIG.value is None or not _WORKDIR.value:
        cli.fail("both --config=configs/NAME.py and --workdir=DIR are required")
    cli.start_distributed()
    cli.enable_compilation_cache()
    from ldm_jax.training.loop import train  # after distributed start-up: it touches devices
    with cli.readable_errors():
        train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    sys.exit(cli.run(main))
