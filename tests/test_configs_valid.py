"""Every shipped config validates without its dataset, survives the workdir's config.json, and
ddpm_cifar10 holds the DDPM paper's CIFAR-10 numbers (Ho et al. 2020)."""
import importlib
import json
import os
import pkgutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from ldm_jax import config_utils
from ldm_jax.data import pipeline, shapes_tfds
from ldm_jax.models.unet import count_params
from ldm_jax.training import ddpm_stage

CONFIG_MODULES = sorted(
    name for _, name, is_pkg in pkgutil.iter_modules(configs.__path__)
    if not is_pkg and hasattr(importlib.import_module(f"configs.{name}"), "get_config"))


# Autoencoder configs with LPIPS need its weights file to exist; any file stands in here.
_LPIPS_STAND_IN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conftest.py")


def _get_config(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    if "loss" in config and config.loss.perceptual_weight > 0:
        config.loss.lpips_path = _LPIPS_STAND_IN
    return config


def _json(config):
    """The config as plain JSON values (tuples become lists)."""
    return json.loads(json.dumps(config.to_dict()))


def test_all_config_modules_are_found():
    assert {"ddpm_base", "ddpm_shapes", "ddpm_cifar10"} <= set(CONFIG_MODULES), CONFIG_MODULES


class _NoDataset:
    """Stands in for tensorflow_datasets: any use means validate went to the data."""

    def __init__(self, used):
        self._used = used

    def __getattr__(self, name):
        self._used.append(f"tensorflow_datasets.{name}")
        raise AssertionError(f"validate used tensorflow_datasets.{name}")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    """An empty data dir, and every way of loading or preparing a dataset made to fail and
    recorded (recorded too, in case a caller swallows the error)."""
    data_dir = tmp_path / "no_data"
    data_dir.mkdir()
    used = []
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", _NoDataset(used))
    for module, name in [(pipeline, "load_source"), (pipeline, "make_train_iterator"),
                         (shapes_tfds, "prepare_shapes"), (shapes_tfds, "shapes_data_source")]:
        def trap(*args, _name=name, **kwargs):
            used.append(_name)
            raise AssertionError(f"validate called {_name}")
        monkeypatch.setattr(module, name, trap)
    return data_dir, used


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_config_validates_without_its_dataset(name, no_data):
    data_dir, used = no_data
    config = _get_config(name)
    config.data.data_dir = str(data_dir)
    config_utils.validate(config)
    # With the default data dir too ("" -> $TFDS_DATA_DIR, here the empty dir).
    config_utils.validate(_get_config(name))
    assert used == []
    assert os.listdir(data_dir) == []  # nothing prepared or downloaded


@pytest.mark.parametrize("name", CONFIG_MODULES)
def test_config_round_trips_through_workdir(name, tmp_path):
    config = _get_config(name)
    path = config_utils.save_config(config, str(tmp_path))
    assert os.path.basename(path) == config_utils.CONFIG_FILE
    loaded = config_utils.load_config(str(tmp_path))
    assert _json(loaded) == _json(config)
    config_utils.validate(loaded)


def test_validate_can_reject():
    """The configs above pass because they are valid, not because validate passes anything."""
    config = _get_config("ddpm_cifar10")
    config.data.image_size = 64
    with pytest.raises(config_utils.ConfigError, match="data.image_size"):
        config_utils.validate(config)
    config = _get_config("ddpm_cifar10")
    config.model.attention_resolutions = (12,)
    with pytest.raises(config_utils.ConfigError, match="attention_resolutions"):
        config_utils.validate(config)


def test_ddpm_cifar10_is_the_papers_recipe():
    config = _get_config("ddpm_cifar10")
    assert config.stage == "ddpm"
    assert (config.data.name, config.data.tfds_name, config.data.image_size,
            config.data.random_flip) == ("tfds", "cifar10", 32, True)
    assert tuple(config.model.label_keys) == ()  # unconditional

    # U-Net: ch 128, mult (1, 2, 2, 2), 2 res blocks, self-attention at 16x16, dropout 0.1.
    m = config.model
    assert (m.base_channels, tuple(m.channel_mult), m.num_res_blocks) == (128, (1, 2, 2, 2), 2)
    assert tuple(m.attention_resolutions) == (16,)
    assert m.dropout == 0.1
    model = ddpm_stage.build_model(config)
    shapes = jax.eval_shape(
        lambda k: model.init({"params": k}, jnp.zeros(ddpm_stage.image_shape(config)),
                             jnp.zeros((1,), jnp.int32)), jax.random.PRNGKey(0))["params"]
    n = count_params(shapes)
    assert round(n / 1e6, 1) == 35.7, n  # "35.7 million parameters"
    # Attention at 16x16 only (level 1 of 32 -> 16 -> 8 -> 4), besides the middle block's.
    attn = sorted(k for k in shapes if "attn" in k)
    assert attn == ["down1_attn0", "down1_attn1", "mid_attn",
                    "up1_attn0", "up1_attn1", "up1_attn2"], attn

    # Diffusion: T = 1000, betas linear from 1e-4 to 0.02, eps prediction, the simple loss.
    d = config.diffusion
    assert (d.schedule, d.num_timesteps, d.beta_start, d.beta_end) == ("linear", 1000, 1e-4, 0.02)
    assert (d.parameterization, d.loss_weighting, d.timestep_sampling) == ("eps", "none", "uniform")
    schedule = ddpm_stage.build_schedule(config)
    np.testing.assert_allclose(np.asarray(schedule.betas), np.linspace(1e-4, 0.02, 1000), rtol=1e-6)

    # Optimiser: Adam lr 2e-4, warm-up 5000, gradient clip 1, no weight decay; batch 128,
    # EMA 0.9999, 800k steps.
    o, t = config.optimizer, config.training
    assert (o.lr, o.b1, o.b2, o.weight_decay) == (2e-4, 0.9, 0.999, 0.0)
    assert (o.warmup_steps, o.grad_clip, o.grad_accum_steps) == (5000, 1.0, 1)
    assert (t.batch_size, t.ema_decay, t.num_steps) == (128, 0.9999, 800_000)
    assert config.training.compute_dtype == "float32"
