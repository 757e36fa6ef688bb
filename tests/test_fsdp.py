"""Fully sharded data parallelism: the mesh (data, fsdp) from config.parallel, the sharding
rules, equal training on every mesh shape, and checkpoints that restore across mesh shapes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import tiny_config
from ldm_jax import fsdp, parallel
from ldm_jax.checkpoint import Checkpointer, abstract_with_sharding
from ldm_jax.config_checks import ConfigError
from ldm_jax.training import ddpm_stage
from ldm_jax.training.loop import train
from test_sharded_step import run_steps
from ldm_jax.training.optimizer import make_optimizer


def test_rules_place_each_kind_of_leaf():
    spec = lambda path, shape, size=4, min_size=0: fsdp.partition_spec(path, shape, size, min_size)
    assert spec("params/unet/down0_res0/norm1/scale", (512,)) == P()
    assert spec("params/unet/conv_in/bias", (512,)) == P()
    # HWIO conv: output channels; when they do not divide, the largest axis that does
    assert spec("params/unet/conv_in/kernel", (3, 3, 4, 320)) == P(None, None, None, "fsdp")
    assert spec("params/unet/conv_out/kernel", (3, 3, 320, 6)) == P(None, None, "fsdp", None)
    assert spec("params/unet/time_dense1/kernel", (320, 1280)) == P(None, "fsdp")
    # Adam's moments and the EMA follow the parameter's own path
    assert spec("opt_state/1/0/mu/unet/conv_in/kernel", (3, 3, 4, 320)) == \
        P(None, None, None, "fsdp")
    assert spec("ema_params/unet/label_embedding/embedding", (10, 1280)) == P(None, "fsdp")
    assert spec("params/x/kernel", (3, 5)) == P()                  # nothing divides by 4
    assert spec("params/x/kernel", (64, 64), min_size=2 ** 16) == P()  # too small to split
    assert spec("step", ()) == P() and spec("params/x/kernel", (64, 64), size=1) == P()


def test_mesh_shapes_and_errors():
    assert parallel.mesh_shape(8, -1, 4) == (2, 4)
    assert parallel.mesh_shape(8, 2, -1) == (2, 4)
    assert parallel.mesh_shape(8, 8, 1) == (8, 1)
    for data, fsdp_size, match in ((-1, 3, "does not divide"), (2, 2, "is 4 devices"),
                                   (-1, -1, "cannot both"), (0, 1, "positive")):
        with pytest.raises(ConfigError, match=match):
            parallel.mesh_shape(8, data, fsdp_size)


def _parallel(fsdp_size, min_size=0):
    return tiny_config("", **{"parallel.fsdp": fsdp_size, "parallel.fsdp_min_size": min_size}).parallel


def test_every_mesh_shape_trains_the_same():
    config = tiny_config("", **{"training.batch_size": 16, "optimizer.grad_accum_steps": 2})
    rng = np.random.default_rng(0)
    batches = [rng.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32) for _ in range(3)]
    ref_losses, ref = run_steps(config, jax.devices()[:1], batches)
    ref_leaves = jax.tree_util.tree_leaves(jax.device_get((ref.params, ref.ema_params)))
    for fsdp_size in (1, 4, 2):  # 8x1, 2x4, 4x2
        losses, state = run_steps(config, jax.devices(), batches, _parallel(fsdp_size))
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.ema_params)))
        for a, b in zip(leaves, ref_leaves):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam near 0 magnifies order noise
        if fsdp_size == 1:
            continue
        # Really split: a 3x3x32x32 kernel holds 1/fsdp of its rows on each device, and so do
        # its EMA and Adam moments; the mesh's data axis holds copies.
        kernel = state.params["down1_res0"]["conv2"]["kernel"]
        assert kernel.shape == (3, 3, 32, 32)
        assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 32, 32 // fsdp_size)}
        mu = state.opt_state[1][0].mu["down1_res0"]["conv2"]["kernel"]
        assert {s.data.shape for s in mu.addressable_shards} == {(3, 3, 32, 32 // fsdp_size)}
        total = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
        per_device = sum(s.data.size for x in jax.tree_util.tree_leaves(state.params)
                         for s in x.addressable_shards if s.device == jax.devices()[0])
        assert per_device < total / fsdp_size * 1.1, (per_device, total)


def _losses(history):
    return [(h["step"], h["loss"]) for h in history if "loss" in h]


def test_checkpoint_of_one_mesh_resumes_on_another(tmp_path, shapes_data_dir):
    items = {"training.num_steps": 4, "training.checkpoint_every": 2,
             "parallel.fsdp": 4, "parallel.fsdp_min_size": 0}
    sharded = tiny_config(shapes_data_dir, **items)
    straight = train(sharded, str(tmp_path / "straight"))
    workdir = str(tmp_path / "moved")
    first = train(sharded, workdir, stop_at=2)  # 2x4 up to the checkpoint at step 2
    # the same run as 8x1: the config's mesh fields may change on resume
    second = train(tiny_config(shapes_data_dir, **{**items, "parallel.fsdp": 1}), workdir)
    assert [s for s, _ in _losses(second)] == [3, 4]
    np.testing.assert_allclose([l for _, l in _losses(first) + _losses(second)],
                               [l for _, l in _losses(straight)], rtol=1e-5)

    # ... and its checkpoint restores on one device with the values it was saved with
    config = tiny_config(shapes_data_dir, **items)
    tx, _ = make_optimizer(config.optimizer, config.training.num_steps)
    abstract = jax.eval_shape(lambda k: ddpm_stage.init_state(
        config, ddpm_stage.build_model(config), tx, k), jax.random.PRNGKey(0))
    one = parallel.make_mesh(jax.devices()[:1])
    for mesh, par in ((one, None), (parallel.make_mesh(None, _parallel(4)), _parallel(4))):
        ckpt = Checkpointer(workdir, 3, False)
        state, _ = ckpt.restore(abstract_with_sharding(
            abstract, parallel.state_sharding(mesh, abstract, par)))
        ckpt.close()
        if par is None:
            single = jax.device_get(state.params)
        else:
            for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                            jax.tree_util.tree_leaves(single)):
                np.testing.assert_array_equal(a, b)


def test_text_conditioned_latent_step_is_the_same_sharded():
    """The latent U-Net and its jointly trained text encoder, from a latent cache's batch
    (the step the SD-size runs take), on one device and as 2x4."""
    import jax.numpy as jnp

    from ldm_jax.stages.ldm_plan import abstract_run
    from ldm_jax.training.loop import jit_step

    rng = np.random.default_rng(0)
    from configs import ldm_kl8
    from conftest import set_fields
    from ldm_fixtures import TINY_LDM
    # No first-stage workdir: the batches are a latent cache's, the first stage's shapes come
    # from its config file and its weights are random.
    config = set_fields(ldm_kl8.get_config(), {
        **TINY_LDM, "data.name": "latents", "data.path": "unused", "data.image_size": 32,
        "first_stage.workdir": "/nonexistent", "conditioning.text": True,
        "first_stage.config": "configs/autoencoder_kl_f8_shapes.py",
        "model.attention_levels": (0, 1), "parallel.fsdp_min_size": 0})
    random = lambda a: (jnp.asarray(rng.normal(size=a.shape) * 0.02, a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else jnp.zeros(a.shape, a.dtype))
    spec = abstract_run(config, parallel.make_mesh(jax.devices()[:1]))[1]
    batches = [{"latents": rng.normal(size=spec["latents"].shape).astype(np.float32),
                "ids": rng.integers(0, 1000, spec["ids"].shape).astype(np.int32),
                "mask": np.ones(spec["mask"].shape, bool)} for _ in range(2)]
    frozen = None
    results = []
    for devices, fsdp_size in ((jax.devices()[:1], 1), (jax.devices(), 4)):
        config.parallel.fsdp = fsdp_size
        mesh = parallel.make_mesh(devices, config.parallel)
        run, _, frozen_abstract, _ = abstract_run(config, mesh)
        if frozen is None:  # the same random first stage for both meshes
            frozen = jax.tree_util.tree_map(random, frozen_abstract)
        abstract = jax.eval_shape(run.init, jax.random.PRNGKey(0))
        sharding = parallel.state_sharding(mesh, abstract, config.parallel)
        state = jax.jit(run.init, out_shardings=sharding)(jax.random.PRNGKey(0))
        step = jit_step(run, mesh, sharding, False)
        flags = parallel.global_flags(np.zeros(len(devices), np.int32), mesh)
        losses = []
        for b in batches:
            state, metrics, _ = step(state, parallel.global_batch(b, mesh), frozen, flags)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state.params)))
    (l1, p1), (l8, p8) = results
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(p8), jax.tree_util.tree_leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
