"""Shared command-line plumbing: distributed flags and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import os
import sys
import traceback

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
    check_distributed_flags(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    from ldm_jax.parallel import initialize_distributed
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def check_distributed_flags(address: str, num_processes: int, process_id: int) -> None:
    """The multi-host flags come as a set of three, or not at all; fail on anything else."""
    usage = ("pass --coordinator_address=HOST:PORT (process 0's), --num_processes=N and "
             "--process_id=0..N-1 together, or none")
    if not address:
        given = ([f"--num_processes={num_processes}"] if num_processes != 0 else []) + \
                ([f"--process_id={process_id}"] if process_id != -1 else [])
        if given:
            fail(f"{' '.join(given)} without --coordinator_address; {usage}")
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        fail(f"--coordinator_address={address!r} is not HOST:PORT (e.g. 10.0.0.1:1234); {usage}")
    missing = ([f"--num_processes=N (got {num_processes})"] if num_processes < 1 else []) + \
              ([f"--process_id=0..N-1 (got {process_id})"] if process_id < 0 else [])
    if missing:
        fail(f"--coordinator_address={address} also needs {' and '.join(missing)}, "
             "the same N in every process")
    if process_id >= num_processes:
        fail(f"--process_id={process_id} is not below --num_processes={num_processes}; "
             "number the processes 0..N-1")


def check_workdir(path: str, flag: str = "--workdir") -> None:
    """Fail now, before any work, when `path` cannot be (created and) written; creates nothing."""
    from ldm_jax.utils.paths import unwritable_reason
    reason = unwritable_reason(path, directory=True)
    if reason:
        fail(f"{flag}={path} cannot be created or written ({reason}); "
             "pass a directory you can write to")


def default_workdir(argv) -> str:
    """workdirs/NAME for --config=configs/NAME.py: where train.py writes without --workdir."""
    name = os.path.splitext(os.path.basename(_config_path(argv) or "run"))[0]
    return os.path.join("workdirs", name)


def fail(message: str, code: int = 2):
    """Print one line naming the cause and exit."""
    print(f"error: {message}", file=sys.stderr)
    _exit(code, message)


def _in_multi_process_job() -> bool:
    if "jax" not in sys.modules:
        return False
    from jax._src import distributed
    return distributed.global_state.client is not None


def _exit(code: int, message: str):
    """Exit; in a multi-process job, first tell the other processes, and skip the shutdown
    barrier that would wait minutes for them."""
    if _in_multi_process_job():
        from ldm_jax import parallel
        parallel.report_failure(message)
        parallel.exit_without_shutdown(code)
    sys.exit(code)


@contextlib.contextmanager
def readable_errors():
    """Turn bad-input errors and run failures into one line; real bugs keep their traceback."""
    from ldm_jax.config_utils import ConfigError
    from ldm_jax.parallel import PeerFailedError
    from ldm_jax.training.step_guard import TrainingDivergedError
    from ldm_jax.utils.image_grid import ImageOutputError
    try:
        yield
    except (ConfigError, FileNotFoundError, NotADirectoryError, ImageOutputError) as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e}; check the paths given in the config and flags")
    except (TrainingDivergedError, PeerFailedError) as e:
        fail(str(e), code=1)


def run(main) -> int:
    """Parse flags and call main; flag errors (unknown config key, wrong type) become one line."""
    use_fast_cpu_flags()  # before anything creates a JAX backend
    if "config" in FLAGS:
        _check_config_file(_config_path(sys.argv))
    try:
        argv = FLAGS(sys.argv)
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:  # config_flags' report of an override of a missing field
        fail(f"unknown config key {_unknown_override(sys.argv) or e}; check the spelling against "
             "the config file (every field there can be overridden, no new ones added)")
    try:
        main(argv)
    except Exception as e:  # a bug: keep the traceback, and do not leave the other processes waiting
        if not _in_multi_process_job():
            raise
        traceback.print_exc()
        _exit(1, f"{type(e).__name__}: {e}")
    return 0


def _config_path(argv) -> str | None:
    """The value of --config (written --config=PATH or --config PATH), without a ':ARG' tail."""
    path = None  # the last one wins, as in absl
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            break
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            path = value.split(":", 1)[0]
    return path


def _load_config_module(path: str):
    import importlib.machinery
    import importlib.util

    loader = importlib.machinery.SourceFileLoader("_config_for_check", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def _check_config_file(path: str | None) -> None:
    """One line, instead of config_flags' traceback, for a --config that cannot be a config file."""
    if path is None:
        return
    hint = "pass --config=configs/NAME.py (a Python file defining get_config())"
    if not path:
        fail(f"--config is empty; {hint}")
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        fail(f"--config={path}: no such file{where}; {hint}")
    if os.path.isdir(path):
        fail(f"--config={path} is a directory; {hint}")
    if not path.endswith(".py"):
        fail(f"--config={path} is not a Python file (.py); {hint}")
    try:
        module = _load_config_module(path)
    except SyntaxError as e:
        fail(f"--config={path} is not valid Python (line {e.lineno}: {e.msg}); fix it or {hint}")
    except (UnicodeDecodeError, ValueError) as e:  # e.g. binary content, null bytes
        fail(f"--config={path} cannot be read as Python source ({str(e).splitlines()[0][:80]}); "
             f"{hint}")
    if not callable(getattr(module, "get_config", None)):
        fail(f"--config={path} defines no get_config() function; {hint}")


def _unknown_override(argv) -> str | None:
    """The first --config.a.b=v whose path a.b is not a field of the --config file."""
    path = _config_path(argv)
    if not path:
        return None
    try:
        config = _load_config_module(path).get_config()
    except Exception:  # noqa: BLE001 - only a better message is at stake here
        return None
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
