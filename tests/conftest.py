"""Test set-up: 8 fake CPU devices (set before JAX is imported), a shared compilation cache,
and a tiny DDPM config on a small locally prepared shapes dataset."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ldm_jax.xla_cpu import use_fast_cpu_flags  # noqa: E402

use_fast_cpu_flags()

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ["LDM_JAX_CACHE_DIR"] = path  # for train.py / sample.py subprocesses
    # Converted Inception weights and reference features: converted once per test session,
    # never in the user's ~/.cache.
    os.environ["LDM_JAX_CACHE"] = str(tmp_path_factory.mktemp("ldm_jax_cache"))
    return path


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    from ldm_jax.data import shapes_tfds
    path = str(tmp_path_factory.mktemp("tfds"))
    shapes_tfds.prepare_shapes(path, image_size=32, num_train=64)
    return path


# The ddpm_shapes config shrunk to a ~100k-parameter U-Net on a 64-image dataset.
TINY = {
    "data.num_train": 64,
    "model.base_channels": 16,
    "model.channel_mult": (1, 2),
    "model.num_res_blocks": 1,
    "model.attention_resolutions": (16,),
    "model.norm_groups": 8,
    "model.dropout": 0.1,
    "optimizer.warmup_steps": 2,
    "optimizer.schedule": "constant",
    "training.batch_size": 8,
    "training.log_every": 1,
    "training.checkpoint_every": 2,
    "training.sample_every": 0,
    "training.progress_bar": False,
    "sampling.num_steps": 4,
}


def _tiny_items(data_dir, overrides):
    items = {**TINY, "data.data_dir": data_dir}
    items.update({k.replace("__", "."): v for k, v in overrides.items()})
    return items


def tiny_config(data_dir: str, **overrides):
    """Tiny config object; overrides as {"training.num_steps": 4} (dotted keys)."""
    from configs import ddpm_shapes
    return set_fields(ddpm_shapes.get_config(), _tiny_items(data_dir, overrides))


def set_fields(config, items: dict):
    """Set {"a.b": value} fields of a ConfigDict in place; returns it."""
    for dotted, value in items.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def tiny_cli_args(data_dir: str, **overrides) -> list:
    """The same tiny config as train.py flags."""
    def render(v):
        return str(v).replace(" ", "") if isinstance(v, tuple) else str(v)
    return [f"--config.{k}={render(v)}" for k, v in _tiny_items(data_dir, overrides).items()]


def abstract_params(config):
    """ShapeDtypeStructs of the config's U-Net params, replicated on all devices (for restores)."""
    from ldm_jax import parallel
    from ldm_jax.training import ddpm_stage
    from ldm_jax.training.optimizer import make_optimizer
    model = ddpm_stage.build_model(config)
    tx, _ = make_optimizer(config.optimizer, config.training.num_steps)
    abstract = jax.eval_shape(lambda k: ddpm_stage.init_state(config, model, tx, k),
                              jax.random.PRNGKey(0)).params
    sharding = parallel.replicated(parallel.make_mesh())
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)


def tensorboard_steps(logdir, tag):
    """The steps of `tag` TensorBoard shows: in file order, a session START event at step S
    hides the earlier events of steps >= S (how a restarted run supersedes its old records)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps = []
    for name in sorted(os.listdir(logdir)):  # event file names start with their creation time
        with open(os.path.join(logdir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):  # TFRecord frames: length, crc, payload, crc
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 16 + length
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps
