"""Concat-conditioned latent models end to end: 4x super-resolution and mask-conditioned
inpainting, trained for two steps on an f=4 first stage and sampled through sample.py's code
with input pictures from files."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import set_fields  # noqa: F401 (conftest also sets up the 8 fake devices)
from ldm_fixtures import tiny_ldm_config
from ldm_jax import config_utils
from ldm_jax.config_checks import ConfigError
from ldm_jax.training.loop import train
from ldm_jax.utils.image_grid import read_png_metadata

_OPTIONS = dict(num=2, steps=2, sampler=None, eta=None, seed=0, out=None, raw_params=False,
                step=None, guidance=None, split="test", caption=None, reconstruct=False,
                latent_scale=False, prompts=None, negative_prompt=None, classes=None,
                init_image=None, strength=None, mask=None)


@pytest.fixture(scope="module")
def first_stage_f4(shapes_data_dir, tmp_path_factory):
    """A 1-step f=4 autoencoder: 32px images -> 8x8x4 latents."""
    from test_autoencoder_stage import tiny_ae_config
    workdir = str(tmp_path_factory.mktemp("first_stage_f4"))
    train(tiny_ae_config(shapes_data_dir, **{"training.num_steps": 1,
                                             "model.ch_mult": (1, 2, 2)}), workdir)
    return workdir


def _train(config, workdir):
    train(config, workdir)
    return config_utils.load_config(workdir)


def _sample(workdir, config, tmp_path, **options):
    from ldm_jax.stages.ldm_sample import sample_workdir
    out = str(tmp_path / "out.png")
    line = sample_workdir(workdir, config, {**_OPTIONS, "out": out, **options})
    return line, out


def test_super_resolution_from_a_small_picture(shapes_data_dir, first_stage_f4, tmp_path):
    config = tiny_ldm_config(shapes_data_dir, first_stage_f4, base="ldm_kl8_sr",
                             **{"training.num_steps": 2, "model.attention_levels": (1,)})
    workdir = str(tmp_path / "sr")
    config = _train(config, workdir)
    small = str(tmp_path / "small.png")
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(small)
    line, out = _sample(workdir, config, tmp_path, init_image=small)
    assert "wrote" in line
    meta = read_png_metadata(out)
    assert meta["task"] == "super_resolution" and meta["checkpoint_step"] == "2"
    with pytest.raises(ConfigError, match="does super-resolution"):
        _sample(workdir, config, tmp_path, init_image=small, mask=small)


def test_mask_conditioned_inpainting_from_files(shapes_data_dir, first_stage_f4, tmp_path):
    config = tiny_ldm_config(shapes_data_dir, first_stage_f4, base="ldm_kl8_inpaint",
                             **{"training.num_steps": 2})
    workdir = str(tmp_path / "inpaint")
    config = _train(config, workdir)
    picture, mask = str(tmp_path / "in.png"), str(tmp_path / "mask.png")
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(picture)
    m = np.zeros((32, 32), np.uint8)
    m[8:24, 8:24] = 255
    Image.fromarray(m).save(mask)
    line, out = _sample(workdir, config, tmp_path, init_image=picture, mask=mask,
                        prompts=["a large red circle in the center on a gray background"])
    meta = read_png_metadata(out)
    assert meta["task"] == "inpaint"
    assert json.loads(meta["prompts"]) == ["a large red circle in the center on a gray "
                                           "background"] * 2
    with Image.open(out) as grid:  # each cell: the masked input beside the result, enlarged
        assert grid.width > 2 * 64
    with pytest.raises(ConfigError, match="--mask needs --init_image"):
        _sample(workdir, config, tmp_path, mask=mask)
