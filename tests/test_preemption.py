"""SIGTERM makes train.py save and exit 0; re-running continues exactly. A second signal exits
at once. Non-finite steps can be skipped and counted instead of ending the run."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, abstract_params, tensorboard_steps, tiny_cli_args, tiny_config
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training.loop import train
from ldm_jax.training.step_guard import StepWatch, TrainingDivergedError, guard_step
from ldm_jax.training.train_state import TrainState

# No periodic checkpoint before the end: the one the signal asks for is all there is to resume.
OVERRIDES = {"training.num_steps": 40, "training.checkpoint_every": 1000}


def logged(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def signal_when_logged(procs, workdir, min_step, target=None, timeout=300):
    """Send SIGTERM to `target` (default every process) once `min_step` steps are logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        if len(logged(workdir)) >= min_step:
            for p in (procs if target is None else [target]):
                p.send_signal(signal.SIGTERM)
            return
        time.sleep(0.01)
    outs = [p.communicate()[0][-3000:] for p in procs]
    raise AssertionError(f"the run ended or stalled before step {min_step}: {outs}")


def stopped_step(output):
    line = next(line for line in output.splitlines() if "stopped at step" in line)
    return int(line.split("stopped at step ", 1)[1].split(" ", 1)[0])


def test_sigterm_saves_exits_zero_and_rerun_continues_exactly(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "preempted")
    cmd = [sys.executable, "train.py", "--config=configs/ddpm_shapes.py", f"--workdir={workdir}",
           *tiny_cli_args(shapes_data_dir, **OVERRIDES)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    signal_when_logged([proc], workdir, 3)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM received" in out
    stop = stopped_step(out)
    assert 3 <= stop < 40
    assert Checkpointer(workdir, read_only=True).latest_step() == stop
    assert [r["step"] for r in logged(workdir)] == list(range(1, stop + 1))

    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from step {stop}" in rerun.stdout

    config = tiny_config(shapes_data_dir, **OVERRIDES)
    straight = train(config, str(tmp_path / "straight"))
    records = logged(workdir)
    assert [r["step"] for r in records] == list(range(1, 41))  # each step once
    assert tensorboard_steps(os.path.join(workdir, "tensorboard"), "train/loss") == \
        list(range(1, 41))
    assert [r["loss"] for r in records] == [h["loss"] for h in straight]
    abstract = abstract_params(config)
    ours = Checkpointer(workdir, read_only=True).restore_subtree("params", abstract)
    theirs = Checkpointer(str(tmp_path / "straight"), read_only=True).restore_subtree("params", abstract)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_second_signal_exits_at_once():
    script = ("import os, signal, time\n"
              "from ldm_jax.training.preemption import StopRequest\n"
              "with StopRequest() as r:\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(0.2)\n"
              "    assert r.requested and r.signal_name == 'SIGTERM'\n"
              "    print('first signal only noted', flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    time.sleep(5)\n"
              "print('not reached')\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 128 + signal.SIGINT, (r.returncode, r.stderr)
    assert "first signal only noted" in r.stdout and "not reached" not in r.stdout
    assert "SIGINT again: exiting now" in r.stderr


def test_nonfinite_steps_are_skipped_and_counted():
    def step(state, batch, frozen):  # a stand-in stage step: the loss is NaN where the batch says so
        loss = jnp.where(batch["bad"][0] > 0, jnp.nan, 1.0)
        return state.replace(step=state.step + 1, params=state.params + 1.0), {"loss": loss}

    state = TrainState(step=jnp.int32(0), params=jnp.zeros(()), ema_params=jnp.zeros(()),
                       opt_state=(), rng=jax.random.PRNGKey(0))
    flags = jnp.zeros((1,), jnp.int32)
    for skip in (True, False):
        fn = jax.jit(guard_step(step, skip_nonfinite=skip))
        s, watch, notes = state, StepWatch(skip, skipped=2, note=lambda m: None), []
        for bad in (0, 1, 0):
            s, metrics, controls = fn(s, {"bad": jnp.array([bad])}, None, flags)
            watch.push(int(s.step), metrics, controls)
            if skip:
                notes.append([ok for _, _, ok in watch.settle()])
        if skip:
            assert int(s.step) == 3 and float(s.params) == 2.0  # the NaN step changed nothing
            assert notes == [[True], [False], [True]] and watch.skipped == 3
        else:
            with pytest.raises(TrainingDivergedError,
                               match=r"step 2 produced non-finite values \(loss nan\)"):
                watch.settle()
    controls = fn(state, {"bad": jnp.array([0])}, None, jnp.ones((1,), jnp.int32))[2]
    assert int(controls["stop"]) == 1
