"""Sampling reads only the params it uses from a checkpoint (EMA or raw, never the optimiser
state), and follows the config's sampling.use_ema unless told --raw_params."""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import tiny_config
from ldm_jax import config_utils, generate, parallel
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training.loop import train


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shapes_data_dir):
    path = str(tmp_path_factory.mktemp("lean"))
    # A fast EMA and no warm-up, so EMA and raw params differ after 2 steps.
    train(tiny_config(shapes_data_dir, **{"training.num_steps": 2, "training.ema_decay": 0.5,
                                          "optimizer.warmup_steps": 0}), path)
    return path


def test_restores_only_the_params_asked_for(workdir, monkeypatch):
    requested = []
    original = ocp.CheckpointManager.restore

    def spy(self, step, args=None, **kwargs):
        requested.append(args)
        return original(self, step, args=args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", spy)
    config = config_utils.load_config(workdir)
    mesh = parallel.make_mesh()
    _, ema, step = generate.load_params(workdir, config, mesh, use_ema=True)
    _, raw, _ = generate.load_params(workdir, config, mesh, use_ema=False)
    assert step == 2
    items = [dict(a.items()) for a in requested]
    assert [list(i) for i in items] == [["state"], ["state"]]
    assert [list(i["state"].item) for i in items] == [["ema_params"], ["params"]]

    monkeypatch.setattr(ocp.CheckpointManager, "restore", original)
    full = _restore_full_state(workdir, config, mesh)
    for got, want in ((ema, full.ema_params), (raw, full.params)):
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ema),
                                                        jax.tree_util.tree_leaves(raw)))


def test_missing_step_is_a_clear_error(workdir):
    config = config_utils.load_config(workdir)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at step 7 .*choose --step from \[2\]"):
        generate.load_params(workdir, config, parallel.make_mesh(), step=7)


def test_config_use_ema_is_honoured(workdir, monkeypatch, tmp_path):
    path = os.path.join(workdir, config_utils.CONFIG_FILE)
    with open(path) as f:
        saved = json.load(f)
    saved["sampling"]["use_ema"] = False
    with open(path, "w") as f:
        json.dump(saved, f)
    asked = []
    original = generate.load_params
    monkeypatch.setattr(generate, "load_params",
                        lambda *a, **k: asked.append(a[3]) or original(*a, **k))
    for use_ema in (None, False, True):  # sample.py passes None, or False for --raw_params
        generate.sample_from_workdir(workdir, num=1, steps=1, out=str(tmp_path / "s.png"),
                                     use_ema=use_ema)
    assert asked == [False, False, True]


def _restore_full_state(workdir, config, mesh):
    from ldm_jax.checkpoint import abstract_with_sharding
    from ldm_jax.training import ddpm_stage
    from ldm_jax.training.optimizer import make_optimizer
    model = ddpm_stage.build_model(config)
    tx, _ = make_optimizer(config.optimizer, config.training.num_steps)
    abstract = jax.eval_shape(lambda k: ddpm_stage.init_state(config, model, tx, k),
                              jax.random.PRNGKey(0))
    state, _ = Checkpointer(workdir, read_only=True).restore(
        abstract_with_sharding(abstract, parallel.state_sharding(mesh, abstract)))
    return state
