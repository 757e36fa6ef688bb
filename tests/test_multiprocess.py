"""A 2-process job (jax.distributed over localhost, 2 CPU devices each) gives the same losses as
one process; SIGTERM to one process stops both at the same step with a checkpoint, and the
re-run continues exactly; a process that fails at start-up ends the other within seconds."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import ROOT, tiny_cli_args, tiny_config
from ldm_jax.checkpoint import Checkpointer
from ldm_jax.training.loop import train
from test_preemption import signal_when_logged, stopped_step

OVERRIDES = {"training.num_steps": 30, "training.batch_size": 8,
             "training.checkpoint_every": 1000}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(workdir, data_dir, extra=(), per_process=((), ())):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    return [subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/ddpm_shapes.py", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *tiny_cli_args(data_dir, **OVERRIDES), *extra, *per_process[i]],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]


def _finish(procs, timeout=600):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one_and_stop_together_on_sigterm(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "two")
    procs = _start_two_processes(workdir, shapes_data_dir)
    # Only process 1 is signalled; both must save the same step and exit 0.
    signal_when_logged(procs, workdir, 3, target=procs[1])
    outs = _finish(procs)
    assert "4 devices, 2 process(es)" in outs[0]
    stop = stopped_step(outs[0])
    assert 3 <= stop < 30 and "SIGTERM received" in outs[1]
    assert Checkpointer(workdir, read_only=True).latest_step() == stop
    assert [r["step"] for r in _logged(workdir)] == list(range(1, stop + 1))

    # The same 2-process command resumes from the agreed step and finishes the run, with every
    # parameter now split over all 4 devices of both processes (a 1 x 4 data x fsdp mesh).
    fsdp = ("--config.parallel.fsdp=4", "--config.parallel.fsdp_min_size=0")
    outs = _finish(_start_two_processes(workdir, shapes_data_dir, extra=fsdp))
    assert f"resumed from step {stop}" in outs[0] and "as data 1 x fsdp 4" in outs[0]
    two = _logged(workdir)
    assert [r["step"] for r in two] == list(range(1, 31))

    one = train(tiny_config(shapes_data_dir, **OVERRIDES), str(tmp_path / "one"),
                devices=jax.devices()[:4])
    np.testing.assert_allclose([r["loss"] for r in two], [h["loss"] for h in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [h["grad_norm"] for h in one],
                               rtol=1e-4)


def test_failure_of_one_process_ends_the_other_fast(tmp_path, shapes_data_dir):
    # Process 1 gets a data dir it cannot create (its parent is a file), so it fails while
    # preparing data; process 0 goes on to its next meeting point and must not wait there.
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    start = time.time()
    procs = _start_two_processes(str(tmp_path / "wd"), shapes_data_dir, per_process=(
        (), (f"--config.data.data_dir={blocker / 'tfds'}",)))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    elapsed = time.time() - start
    assert procs[1].returncode != 0 and procs[0].returncode != 0, outs
    assert elapsed < 90, (elapsed, outs)
    assert "process 1 of the job failed" in outs[0], outs[0][-2000:]
