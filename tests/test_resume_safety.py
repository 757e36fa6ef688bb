"""Resuming checks the command's config against the checkpoint before anything is written;
a diverging run stops at the bad step and leaves its last checkpoint loadable."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, abstract_params, tiny_cli_args, tiny_config
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.config_utils import ConfigError
from ldm_jax.training import resume_check
from ldm_jax.training.loop import train
from ldm_jax.training.step_guard import TrainingDivergedError

STEPS = {"training.num_steps": 2}


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, shapes_data_dir):
    """A workdir holding a 2-step run (checkpoint at step 2); tests copy it before resuming."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train(tiny_config(shapes_data_dir, **STEPS), workdir)
    return workdir


def _copy(src, dst):
    subprocess.run(["cp", "-r", src, dst], check=True)
    return dst


def _snapshot(workdir):
    """Every file under the workdir with its bytes."""
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = f.read()
    return out


@pytest.mark.parametrize("change,field", [
    ({"model.base_channels": 32}, "model.base_channels 16 -> 32"),
    ({"training.batch_size": 16}, "training.batch_size 8 -> 16"),
])
def test_changed_model_or_batch_is_one_line_and_touches_nothing(tmp_path, trained_workdir,
                                                                 shapes_data_dir, change, field):
    workdir = _copy(trained_workdir, str(tmp_path / "wd"))
    before = _snapshot(workdir)
    r = subprocess.run([sys.executable, "train.py", "--config=configs/ddpm_shapes.py",
                        f"--workdir={workdir}",
                        *tiny_cli_args(shapes_data_dir, **STEPS, **change)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    error = [line for line in lines if line.startswith("error:")]
    assert len(error) == 1 and field in error[0] and "--allow_config_change" in error[0], lines
    assert _snapshot(workdir) == before  # config.json byte-identical, checkpoints untouched


def test_harmless_change_resumes_and_num_steps_says_what_it_does(tmp_path, trained_workdir,
                                                                 shapes_data_dir, capsys):
    workdir = _copy(trained_workdir, str(tmp_path / "wd"))
    config = tiny_config(shapes_data_dir, **{"training.num_steps": 4, "training.log_every": 2,
                                             "training.checkpoint_every": 4})
    history = train(config, workdir)
    assert [h["step"] for h in history] == [4]
    out = capsys.readouterr().out
    assert "resumed from step 2" in out
    assert "training.num_steps 2 -> 4: the learning rate at step 2 is unchanged" in out
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["training"]["log_every"] == 2  # written after the check passed


def test_allowed_change_resumes_and_impossible_one_is_refused(tmp_path, trained_workdir,
                                                              shapes_data_dir, capsys):
    workdir = _copy(trained_workdir, str(tmp_path / "wd"))
    lr = tiny_config(shapes_data_dir, **{"training.num_steps": 3, "optimizer.lr": 5e-4})
    with pytest.raises(ConfigError, match=r"optimizer.lr 0.001 -> 0.0005.*"
                                          r"--allow_config_change=optimizer.lr"):
        train(lr, workdir)
    history = train(lr, workdir, allow_changes=("optimizer.lr",))
    assert [h["step"] for h in history] == [3]
    assert "allowed by --allow_config_change: optimizer.lr 0.001 -> 0.0005" in \
        capsys.readouterr().out

    wider = tiny_config(shapes_data_dir, **{"training.num_steps": 4, "optimizer.lr": 5e-4,
                                            "model.base_channels": 32})
    before = _snapshot(workdir)
    with pytest.raises(ConfigError, match="does not fit the changed config.*new --workdir"):
        train(wider, workdir, allow_changes=("model.base_channels",))
    assert _snapshot(workdir) == before


def test_check_resume_classifies_fields():
    stored = {"seed": 0, "training": {"log_every": 10, "num_steps": 5, "batch_size": 8},
              "sampling": {"num_steps": 50}, "model": {"channel_mult": [1, 2]}}
    same = {"seed": 0, "training": {"log_every": 99, "num_steps": 9, "batch_size": 8},
            "sampling": {"num_steps": 10}, "model": {"channel_mult": (1, 2)}}
    assert resume_check.check_resume(stored, same, 5) == []
    changed = {**same, "seed": 1, "model": {"channel_mult": (1, 2, 2)}}
    with pytest.raises(ConfigError, match=r"model.channel_mult \(1,2\) -> \(1,2,2\), seed 0 -> 1"):
        resume_check.check_resume(stored, changed, 5)
    with pytest.raises(ConfigError, match="--allow_config_change=seed"):
        resume_check.check_resume(stored, changed, 5, allowed=("model.channel_mult",))
    assert len(resume_check.check_resume(stored, changed, 5, allowed=("all",))) == 2


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, shapes_data_dir):
    # lr warms up from 0, so step 1 is finite and saved; then an absurd lr blows the weights up.
    config = tiny_config(shapes_data_dir, **{"training.num_steps": 8, "optimizer.lr": 1e8,
                                             "optimizer.warmup_steps": 3, "optimizer.grad_clip": 0.0,
                                             "training.checkpoint_every": 1})
    workdir = str(tmp_path / "nan")
    with pytest.raises(TrainingDivergedError) as info:
        train(config, workdir)
    message = str(info.value)
    bad_step = int(message.split("step ", 1)[1].split(" ", 1)[0])
    ckpt = Checkpointer(workdir, async_save=False, read_only=True)
    last = ckpt.latest_step()
    assert 1 <= last < bad_step, (last, message)
    assert f"the last checkpoint, step {last} in" in message and "non-finite" in message
    params = ckpt.restore_subtree("params", abstract_params(config), last)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree_util.tree_leaves(params))
