"""python -m ldm_jax.memory: per-device bytes of a run, known before it runs."""
import os
import subprocess
import sys

import jax

from conftest import ROOT, tiny_config
from ldm_jax import memory_plan, parallel
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer


def _config(fsdp):
    return tiny_config("", **{"parallel.fsdp": fsdp, "parallel.fsdp_min_size": 0,
                              "training.batch_size": 16})


def _measured_state_bytes(config, part):
    """Bytes device 0 really holds of `part` after the state is built on the mesh."""
    mesh = parallel.make_mesh(None, config.parallel)
    model = ddpm_stage.build_model(config)
    tx, _ = make_optimizer(config.optimizer, config.training.num_steps)
    init = lambda k: ddpm_stage.init_state(config, model, tx, k)
    sharding = parallel.state_sharding(mesh, jax.eval_shape(init, jax.random.PRNGKey(0)),
                                       config.parallel)
    state = jax.jit(init, out_shardings=sharding)(jax.random.PRNGKey(0))
    device = mesh.devices.flat[0]
    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(getattr(state, part))
               for s in x.addressable_shards if s.device == device)


def test_planned_bytes_agree_with_the_built_state_and_xla():
    replicated = memory_plan.plan(_config(1), compile_step=False)
    result = memory_plan.plan(_config(4))
    assert result["mesh"] == (2, 4)
    pd = result["per_device"]
    for part in ("params", "ema_params", "opt_state"):
        assert pd[part] == _measured_state_bytes(_config(4), part)
        assert pd[part] < replicated["per_device"][part] / 4 * 1.05, part
    assert replicated["per_device"]["params"] == replicated["whole"]["params"]
    # XLA's arguments are exactly the state, batch rows, frozen inputs and stop flags
    # each device holds
    assert result["xla"]["argument"] == sum(pd.values())
    assert result["xla"]["temp"] > 0
    assert memory_plan.peak_bytes(result) >= result["xla"]["argument"]


def test_sd_v1_parameters_split_over_eight():
    from configs import sd_v1
    config = sd_v1.get_config()
    config.parallel.fsdp, config.training.batch_size = 8, 16
    result = memory_plan.plan(config, compile_step=False)
    whole, pd = result["whole"], result["per_device"]
    assert whole["params"] == 859_520_964 * 4  # SD v1's U-Net in float32
    assert whole["opt_state"] >= 2 * whole["params"]  # Adam's two moments
    assert whole["params"] / 8 <= pd["params"] < whole["params"] / 8 * 1.01
    assert pd["frozen inputs"] > 0  # the VAE and CLIP text encoder, replicated
    assert any("49,408" in n for n in result["notes"])


def test_memory_command_prints_the_table():
    out = subprocess.run(
        [sys.executable, "-m", "ldm_jax.memory", "--config=configs/ddpm_shapes.py",
         "--devices=8", "--config.parallel.fsdp=4", "--config.training.batch_size=16",
         "--config.model.base_channels=16", "--config.model.channel_mult=(1,2)",
         "--config.model.norm_groups=8", "--config.model.attention_resolutions=(16,)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mesh data=2 x fsdp=4 (8 cpu devices)" in out.stdout
    for line in ("parameters", "optimiser state", "EMA", "XLA: step temporaries", "peak"):
        assert line in out.stdout, out.stdout
    bad = subprocess.run([sys.executable, "-m", "ldm_jax.memory", "--config=configs/ddpm_shapes.py",
                          "--devices=8", "--config.parallel.fsdp=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "does not divide the 8 devices" in bad.stderr, bad.stderr[-800:]


def test_autoencoder_stage_is_planned_too():
    from configs import autoencoder_kl_f8_shapes
    config = autoencoder_kl_f8_shapes.get_config()
    config.model.ch, config.model.ch_mult, config.model.norm_groups = 16, (1, 2), 8
    config.loss.disc_channels = 16
    config.training.batch_size, config.parallel.fsdp = 8, 4
    config.parallel.fsdp_min_size = 0
    result = memory_plan.plan(config)
    pd, whole = result["per_device"], result["whole"]
    assert whole["params"] / 4 <= pd["params"] < whole["params"] / 4 * 1.2
    assert pd["other state"] > 0  # the discriminator and its optimiser
    assert result["xla"]["argument"] == sum(pd.values())
