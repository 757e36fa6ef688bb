"""The latent cache: `python -m ldm_jax.data.cache` encodes a latent-diffusion run's data once
with its frozen first stage; training on the cache (data.name=latents) gives the same losses
as encoding the same examples on the fly, and a cache made with another first stage is
refused."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ldm_fixtures import tiny_ldm_cli_args, tiny_ldm_config
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.training.loop import train
from test_ldm_stage import first_stage_dir, parts  # noqa: F401 (the session's tiny parts)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cache_dir(shapes_data_dir, first_stage_dir, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("cache") / "latents")
    args = [f"--config={ROOT}/configs/ldm_kl8.py", f"--out={out}", "--splits=train",
            *tiny_ldm_cli_args(shapes_data_dir, first_stage_dir)]
    r = subprocess.run([sys.executable, "-m", "ldm_jax.data.cache", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train: 64 examples encoded" in r.stdout
    return out


def test_cache_holds_every_example(cache_dir, shapes_data_dir, first_stage_dir):  # noqa: F811
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir,
                             **{"data.name": "latents", "data.path": cache_dir})
    source = pipeline.load_source(config.data, square=False)
    images = pipeline.load_source(tiny_ldm_config(shapes_data_dir, first_stage_dir).data)
    assert len(source) == len(images) == 64
    record = source[5]
    assert record["latents"].shape == (16, 16, 8)  # KL mean and log-variance, 4 + 4 channels
    caption = images[5]["caption"]
    assert record["caption"] == (caption.decode() if isinstance(caption, bytes) else caption)
    with open(os.path.join(cache_dir, "meta.json")) as f:
        meta = json.load(f)
    assert meta["first_stage"]["workdir"] == os.path.abspath(first_stage_dir)
    with pytest.raises(ConfigError, match="has no validation split"):
        pipeline.load_source(config.data, split="validation")


def test_training_on_the_cache_equals_encoding_on_the_fly(cache_dir, shapes_data_dir,
                                                          first_stage_dir, tmp_path):  # noqa: F811
    steps = {"training.num_steps": 3, "training.log_every": 1, "training.checkpoint_every": 3}
    on_the_fly = train(tiny_ldm_config(shapes_data_dir, first_stage_dir, **steps),
                       str(tmp_path / "images"))
    cached = train(tiny_ldm_config(shapes_data_dir, first_stage_dir, **steps,
                                   **{"data.name": "latents", "data.path": cache_dir}),
                   str(tmp_path / "latents"))
    a = np.array([h["loss"] for h in on_the_fly])
    b = np.array([h["loss"] for h in cached])
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(b, a, rtol=2e-5)
    assert len(set(np.round(a, 6))) == 3  # three different batches, not one loss repeated


def test_a_cache_of_another_first_stage_is_refused(cache_dir, shapes_data_dir, first_stage_dir,
                                                   tmp_path):  # noqa: F811
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(cache_dir, other)
    with open(os.path.join(other, "meta.json")) as f:
        meta = json.load(f)
    meta["first_stage"]["step"] += 1
    with open(os.path.join(other, "meta.json"), "w") as f:
        json.dump(meta, f)
    config = tiny_ldm_config(shapes_data_dir, first_stage_dir,
                             **{"data.name": "latents", "data.path": other,
                                "training.num_steps": 1})
    with pytest.raises(ConfigError, match="was made with the first stage"):
        train(config, str(tmp_path / "run"))


def test_cached_text_context_of_a_frozen_encoder_trains_the_same(parts, shapes_data_dir,  # noqa: F811
                                                                 first_stage_dir, tmp_path):  # noqa: F811
    """With text_encoder.pretrained the cache also holds the frozen encoder's hidden states;
    dropped captions get the empty caption's, as on the fly."""
    from ldm_jax.models import text_encoder_io
    from ldm_jax.stages.latent_cache import write_cache
    config, _, tok, model, _, params = parts
    folder = str(tmp_path / "encoder")
    text_encoder_io.save_pretrained(folder, model.text_encoder, params["text_encoder"], tok)
    fields = {"text_encoder.pretrained": folder, "training.num_steps": 3,
              "training.log_every": 1, "conditioning.p_uncond": 0.5}
    out = str(tmp_path / "cache")
    meta = write_cache(tiny_ldm_config(shapes_data_dir, first_stage_dir, **fields), out,
                       ("train",), log=lambda line: None)
    assert meta["text_encoder"] == os.path.abspath(folder)
    record = pipeline.load_source(tiny_ldm_config(
        shapes_data_dir, first_stage_dir, **fields,
        **{"data.name": "latents", "data.path": out}).data, square=False)[0]
    assert record["context"].shape == (config.text_encoder.max_length, config.text_encoder.width)
    a = train(tiny_ldm_config(shapes_data_dir, first_stage_dir, **fields), str(tmp_path / "a"))
    b = train(tiny_ldm_config(shapes_data_dir, first_stage_dir, **fields,
                              **{"data.name": "latents", "data.path": out}), str(tmp_path / "b"))
    np.testing.assert_allclose([h["loss"] for h in b], [h["loss"] for h in a], rtol=2e-5)


def test_a_float16_cache_is_half_the_size_and_trains_the_same(cache_dir, shapes_data_dir,
                                                              first_stage_dir, tmp_path):  # noqa: F811
    import grain

    from ldm_jax.stages.latent_cache import write_cache
    with pytest.raises(ConfigError, match="--dtype='bfloat16' is not one of"):
        write_cache(tiny_ldm_config(shapes_data_dir, first_stage_dir), str(tmp_path / "x"),
                    dtype="bfloat16")
    half = str(tmp_path / "half")
    meta = write_cache(tiny_ldm_config(shapes_data_dir, first_stage_dir), half, ("train",),
                       log=lambda line: None, dtype="float16")
    assert meta["dtype"] == "float16"

    def stored(path):  # the raw records' sizes
        return [len(r) for r in grain.sources.ArrayRecordDataSource(
            [os.path.join(path, "train.array_record")])]
    ratio = sum(stored(half)) / sum(stored(cache_dir))
    assert 0.45 < ratio < 0.6, ratio  # latents 16x16x8: 8 KB -> 4 KB, plus labels and caption

    def data(path, **fields):
        return tiny_ldm_config(shapes_data_dir, first_stage_dir, **fields,
                               **{"data.name": "latents", "data.path": path})
    full_source = pipeline.load_source(data(cache_dir).data, square=False)
    half_source = pipeline.load_source(data(half).data, square=False)
    for i in (0, 63):
        a, b = full_source[i]["latents"], half_source[i]["latents"]
        assert b.dtype == np.float32 and b.shape == a.shape
        assert not np.array_equal(a, b)  # really rounded, not the float32 values
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
    one = {"training.num_steps": 1, "training.log_every": 1, "training.checkpoint_every": 1}
    a = train(data(cache_dir, **one), str(tmp_path / "full"))[0]["loss"]
    b = train(data(half, **one), str(tmp_path / "half_run"))[0]["loss"]
    np.testing.assert_allclose(b, a, rtol=1e-3)
