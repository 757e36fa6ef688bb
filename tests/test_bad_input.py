"""Bad input to train.py / sample.py: one line on stderr naming the cause and the fix, exit code 2,
no traceback, and nothing written (no workdir, no config.json, no image)."""
import json
import os
import shutil

import numpy as np
import pytest

from conftest import tiny_cli_args, tiny_config
from test_cli import run

SHAPES = "--config=configs/ddpm_shapes.py"


def _one_line(r, *needles):
    """Exit code 2, at most two stderr lines (one error: line), no traceback, every needle in it."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) <= 2, r.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _train_fails(tmp_path, args, *needles):
    workdir = tmp_path / "wd"
    r = run(["train.py", f"--workdir={workdir}", *args], timeout=120)
    _one_line(r, *needles)
    assert not workdir.exists(), os.listdir(workdir)  # not even an empty workdir


# --- 1. --config that is not a config file ------------------------------------------------

@pytest.mark.parametrize("name,content,needles", [
    ("missing.py", None, ["missing.py", "no such file", "--config=configs/NAME.py"]),
    ("config.json", '{"training": {"num_steps": 1}}', ["config.json", "not a Python file"]),
    ("broken.py", "def get_config(:\n", ["broken.py", "not valid Python", "line 1"]),
    ("empty.py", "X = 1\n", ["empty.py", "get_config()"]),
])
def test_config_file_that_cannot_load(tmp_path, name, content, needles):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    _train_fails(tmp_path, [f"--config={path}"], "--config=", *needles)


# --- 2. Config values (all checks in config_utils.validate) -------------------------------

BAD_VALUES = [
    ("training.log_every", 0, "training.log_every=0"),
    ("training.checkpoint_every", -5, "training.checkpoint_every=-5"),
    ("training.batch_size", 0, "training.batch_size=0"),
    ("training.keep_checkpoints", 0, "training.keep_checkpoints=0"),
    ("training.num_samples", 0, "training.sample_every=0"),  # sample_every > 0 in ddpm_shapes
    ("training.sample_every", -1, "training.sample_every=-1"),
    ("data.max_objects", 3, "data.max_objects"),
    ("diffusion.num_timesteps", 1, "diffusion.num_timesteps=1"),
    ("diffusion.num_timesteps", 10**6, "diffusion.num_timesteps=1000000"),
    ("diffusion.beta_start", 0.0, "diffusion.beta_start=0.0"),
    ("diffusion.beta_end", 1.5, "diffusion.beta_end=1.5"),
    ("diffusion.beta_start", 0.05, "swap"),  # above beta_end=0.02
    ("model.num_heads", 3, "model.num_heads=3"),
    ("model.num_heads", 0, "model.num_heads=0"),
    ("model.head_dim", 12, "model.head_dim=12"),
    ("model.head_dim", -8, "model.head_dim=-8"),
    ("sampling.num_steps", 0, "sampling.num_steps=0"),
    ("sampling.num_steps", 1001, "sampling.num_steps=1001"),
    ("sampling.eta", 1.5, "sampling.eta=1.5"),
    ("sampling.eta", -0.1, "sampling.eta=-0.1"),
    ("optimizer.lr", 0.0, "optimizer.lr=0.0"),
    ("optimizer.lr", -1e-4, "optimizer.lr=-0.0001"),
    ("optimizer.warmup_steps", -1, "optimizer.warmup_steps=-1"),
    ("data.num_train", 0, "data.num_train=0"),
]


def _shapes_config(**dotted):
    from configs import ddpm_shapes
    config = ddpm_shapes.get_config()
    config.diffusion.schedule = "linear"  # so that the beta range is checked
    for key, value in dotted.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


@pytest.mark.parametrize("key,value,needle", BAD_VALUES)
def test_validate_rejects(key, value, needle):
    from ldm_jax.config_utils import ConfigError, validate
    with pytest.raises(ConfigError) as e:
        validate(_shapes_config(**{key: value}))
    message = str(e.value)
    assert key in message and needle in message, message
    assert "\n" not in message and len(message) < 230, message


def test_validate_accepts_the_edges():
    from configs import ddpm_base, ddpm_shapes
    from ldm_jax.config_utils import validate
    validate(ddpm_base.get_config())
    validate(ddpm_shapes.get_config())
    # 0 disables sample grids, and then num_samples does not matter; cosine ignores the betas
    validate(_shapes_config(**{"training.sample_every": 0, "training.num_samples": 0}))
    config = _shapes_config(**{"diffusion.beta_start": 0.5, "diffusion.beta_end": 0.0})
    config.diffusion.schedule = "cosine"
    validate(config)
    validate(_shapes_config(**{"sampling.eta": 1.0, "sampling.num_steps": 1000,
                               "diffusion.num_timesteps": 1000, "optimizer.warmup_steps": 0}))
    # head_dim, when set, decides the heads: 16 divides the 64 channels at 8x8 (and the middle)
    validate(_shapes_config(**{"model.head_dim": 16, "model.num_heads": 3}))


def test_head_check_covers_every_attention_level():
    from ldm_jax.config_utils import ConfigError, validate
    # 96 channels at 16x16 (base 32 * 3) take 3 heads; the middle block's 64 channels do not.
    config = _shapes_config(**{"model.num_heads": 3, "model.channel_mult": (1, 3, 2),
                               "model.attention_resolutions": (16,)})
    with pytest.raises(ConfigError, match="64 channels of the attention at 8x8"):
        validate(config)


@pytest.mark.parametrize("override,needles", [
    ("training.log_every=0", ["training.log_every=0", "set training.log_every=1"]),
    ("model.num_heads=3", ["model.num_heads=3", "32 channels of the attention at 16x16"]),
    ("sampling.eta=2.0", ["sampling.eta=2.0", "[0, 1]"]),
])
def test_bad_config_value_through_train_py(tmp_path, shapes_data_dir, override, needles):
    # On the tiny config (would train one step in seconds if the value got through).
    args = [SHAPES, *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 1}),
            f"--config.{override}"]
    _train_fails(tmp_path, args, *needles)


# --- 3. Multi-host flags given in part ----------------------------------------------------

@pytest.mark.parametrize("flags,needles", [
    (["--coordinator_address=127.0.0.1:12355"], ["--num_processes", "--process_id"]),
    (["--num_processes=2", "--process_id=0"], ["without --coordinator_address"]),
    (["--coordinator_address=127.0.0.1:12355", "--num_processes=2", "--process_id=2"],
     ["--process_id=2", "--num_processes=2"]),
])
def test_partial_multi_host_flags(tmp_path, shapes_data_dir, flags, needles):
    args = [SHAPES, *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 1}), *flags]
    _train_fails(tmp_path, args, *needles)


# --- 4. A --workdir that cannot be written ------------------------------------------------

def test_workdir_under_a_regular_file(tmp_path, shapes_data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = blocker / "wd"
    r = run(["train.py", SHAPES, f"--workdir={workdir}",
             *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 1})], timeout=120)
    _one_line(r, "--workdir=", "a_file is a file", "pass a directory you can write to")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write into read-only directories")
def test_workdir_in_read_only_directory(tmp_path, shapes_data_dir):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        r = run(["train.py", SHAPES, f"--workdir={parent / 'wd'}",
                 *tiny_cli_args(shapes_data_dir, **{"training.num_steps": 1})], timeout=120)
        _one_line(r, "--workdir=", "no write permission")
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o755)


# --- 5. sample.py: --out and a damaged config.json ----------------------------------------

@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, shapes_data_dir):
    """A workdir with one checkpoint (one step of the tiny config), trained in-process."""
    from ldm_jax.training.loop import train
    workdir = str(tmp_path_factory.mktemp("trained") / "wd")
    train(tiny_config(shapes_data_dir, **{"training.num_steps": 1,
                                          "training.checkpoint_every": 1}), workdir)
    return workdir


def _listing(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir)
                  for d, _, files in os.walk(workdir) for f in files)


@pytest.mark.parametrize("out,needles", [
    ("grid", ["--out=", "no file extension", ".png"]),
    ("grid.txt", ["grid.txt", "'.txt' is not an image format"]),
    ("a_file/grid.png", ["a_file is a file, not a directory"]),
])
def test_bad_out_fails_before_sampling(tmp_path, trained_workdir, out, needles):
    (tmp_path / "a_file").write_text("x")
    before = _listing(trained_workdir)
    r = run(["sample.py", f"--workdir={trained_workdir}", "--num=2", "--steps=2",
             f"--out={tmp_path / out}"], timeout=120)
    _one_line(r, *needles)
    assert not os.path.exists(tmp_path / out)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]
    assert _listing(trained_workdir) == before  # no samples/ written there either


def test_check_output_path(tmp_path):
    from ldm_jax.utils.image_grid import ImageOutputError, check_output_path
    for name in ("a.png", "b.PNG", "c.jpg", "d.jpeg", "e.webp", "f.gif", "new/dir/g.png"):
        check_output_path(str(tmp_path / name))
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "file").write_text("x")
    for name, needle in [("h.txt", "'.txt' is not an image format"), ("i.xbm", "'.xbm'"),
                         ("j", "no file extension"), ("taken.png", "it is a directory"),
                         ("file/k.png", "file is a file, not a directory"),
                         ("file/deeper/l.png", "file is a file, not a directory")]:
        with pytest.raises(ImageOutputError, match=needle):
            check_output_path(str(tmp_path / name))
    assert sorted(os.listdir(tmp_path)) == ["file", "taken.png"]  # the checks create nothing


@pytest.mark.parametrize("content,needles", [
    ('{"model": {"base_channels": 16,', ["is not valid JSON"]),
    ("[1, 2, 3]", ["not a JSON object"]),
])
def test_damaged_config_json(tmp_path, trained_workdir, content, needles):
    workdir = tmp_path / "wd"
    shutil.copytree(trained_workdir, workdir)
    (workdir / "config.json").write_text(content)
    r = run(["sample.py", f"--workdir={workdir}", "--num=2", "--steps=2",
             f"--out={tmp_path / 'grid.png'}"], timeout=120)
    copy = os.path.join(str(workdir), "checkpoints", "1", "config", "metadata")
    _one_line(r, os.path.join(str(workdir), "config.json"), *needles, copy, "another --workdir")
    assert not (tmp_path / "grid.png").exists()
    with open(copy) as f:  # the copy named is a usable config
        assert json.load(f)["model"]["base_channels"] == 16


# --- 6. NaN / Inf images are an error, not a black grid -----------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_save_grid_refuses_non_finite_images(tmp_path, bad):
    from ldm_jax.utils.image_grid import NonFiniteImagesError, save_grid
    images = np.zeros((4, 8, 8, 3), np.float32)
    images[2, 3, 4, 1] = bad
    path = tmp_path / "out" / "grid.png"
    with pytest.raises(NonFiniteImagesError, match=r"NaN/Inf values in 1 of 4 images.*--step"):
        save_grid(images, str(path), captions=["a"] * 4)
    assert not (tmp_path / "out").exists()
    assert isinstance(NonFiniteImagesError("x"), ValueError)


def test_non_finite_samples_are_one_line(tmp_path, trained_workdir, monkeypatch, capsys):
    """sample_from_workdir writes nothing for NaN samples, and sample.py's handler prints one line."""
    import jax.numpy as jnp

    from ldm_jax import cli, generate, sampling
    from ldm_jax.utils.image_grid import NonFiniteImagesError

    monkeypatch.setattr(sampling, "sample_images",
                        lambda fn, params, seed, steps, eta, labels, scale:
                        jnp.full((2, 32, 32, 3), jnp.nan))
    out = tmp_path / "grid.png"
    with pytest.raises(NonFiniteImagesError):
        generate.sample_from_workdir(trained_workdir, num=2, steps=2, out=str(out))
    assert not out.exists()
    with pytest.raises(SystemExit) as e, cli.readable_errors():
        generate.sample_from_workdir(trained_workdir, num=2, steps=2, out=str(out))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the model produced NaN/Inf"), err
    assert not out.exists()
