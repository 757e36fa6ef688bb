"""Shared command-line plumbing: distributed flags and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import sys

from absl import flags

from ldm_jax.xla_cpu import use_fast_cpu_flags

FLAGS = flags.FLAGS


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 for multi-host jobs.")
    flags.DEFINE_integer("num_processes", 0, "Number of processes in a multi-host job.")
    flags.DEFINE_integer("process_id", -1, "Index of this process in a multi-host job.")


def enable_compilation_cache() -> None:
    """Persist compiled programs across runs (a resumed job skips recompiling its step).

    LDM_JAX_CACHE_DIR overrides the location; set it empty to disable.
    """
    import os

    import jax
    path = os.environ.get("LDM_JAX_CACHE_DIR", os.path.expanduser("~/.cache/ldm_jax/jax_cache"))
    if path:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def start_distributed() -> None:
    from ldm_jax.parallel import initialize_distributed
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def fail(message: str, code: int = 2):
    """Print one line naming the cause and exit."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def readable_errors():
    """Turn bad-input errors into one line; real bugs keep their traceback."""
    from ldm_jax.config_utils import ConfigError
    try:
        yield
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e))


def run(main) -> int:
    """Parse flags and call main; flag errors (unknown config key, wrong type) become one line."""
    use_fast_cpu_flags()  # before anything creates a JAX backend
    try:
        argv = FLAGS(sys.argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:  # config_flags' report of an override of a missing field
        fail(f"unknown config key {_unknown_override(sys.argv) or e}; check the spelling against "
             "the config file (every field there can be overridden, no new ones added)")
    main(argv)
    return 0


def _unknown_override(argv) -> str | None:
    """The first --config.a.b=v whose path a.b is not a field of the --config file."""
    import importlib.util

    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location("_config_for_check", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config."):].split("=", 1)[0]
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                return f"'{key}'"
            node = node[part]
    return None
