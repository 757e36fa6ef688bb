"""Train a model: python train.py --config=configs/ldm_kl8.py [--workdir=DIR] [--config.a.b=v ...]

--workdir defaults to workdirs/NAME for --config=configs/NAME.py.

Re-running the same command resumes from the latest checkpoint in DIR; a config that differs
from the checkpoint's in more than logging/sampling/checkpoint intervals is refused unless the
fields are listed in --allow_config_change. SIGTERM or SIGINT saves a checkpoint and exits 0.
Multi-host: pass --coordinator_address/--num_processes/--process_id, or set
LDM_JAX_DISTRIBUTED=1 where JAX can detect the cluster (SLURM, TPU pods).
"""
import sys

from absl import flags
from ml_collections import config_flags

from ldm_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file under configs/.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples "
                               "(default: workdirs/NAME for --config=configs/NAME.py).")
_ALLOW = flags.DEFINE_list("allow_config_change", [], "When resuming: config fields (a.b,c.d, or "
                           "'all') that may differ from the checkpoint's, for changes you mean.")
cli.define_distributed_flags()


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; options are written --name=value")
    if _CONFIG.value is None:
        cli.fail("--config=configs/NAME.py is required")
    workdir = _WORKDIR.value or cli.default_workdir(sys.argv)
    cli.check_workdir(workdir)  # creates nothing: train() writes the workdir
    from ldm_jax.config_utils import validate
    with cli.readable_errors():
        validate(_CONFIG.value)  # bad values fail here, before a multi-host job starts up
    cli.start_distributed()
    cli.enable_compilation_cache()
    from ldm_jax.training.loop import train  # after distributed start-up: it touches devices
    with cli.readable_errors():
        train(_CONFIG.value, workdir, allow_changes=_ALLOW.value)


if __name__ == "__main__":
    sys.exit(cli.run(main))
