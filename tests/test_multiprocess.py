"""A 2-process job (jax.distributed over localhost, 2 CPU devices each) gives the same losses as
one process, and resumes from its own checkpoint."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from conftest import ROOT, tiny_cli_args, tiny_config
from ldm_jax.training.loop import train

OVERRIDES = {"training.num_steps": 4, "training.batch_size": 8}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two_processes(workdir, data_dir, extra=()):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "train.py", "--config=configs/ddpm_shapes.py", f"--workdir={workdir}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         *tiny_cli_args(data_dir, **OVERRIDES), *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def _logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_match_one(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "two")
    outs = _launch_two_processes(workdir, shapes_data_dir)
    assert "4 devices, 2 process(es)" in outs[0]
    two = _logged(workdir)
    assert [r["step"] for r in two] == [1, 2, 3, 4]

    one = train(tiny_config(shapes_data_dir, **OVERRIDES), str(tmp_path / "one"),
                devices=jax.devices()[:4])
    np.testing.assert_allclose([r["loss"] for r in two], [h["loss"] for h in one], rtol=1e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in two], [h["grad_norm"] for h in one],
                               rtol=1e-4)

    # The same 2-process command, asked for more steps, resumes from step 4.
    _launch_two_processes(workdir, shapes_data_dir, ["--config.training.num_steps=6"])
    assert [r["step"] for r in _logged(workdir)] == [1, 2, 3, 4, 5, 6]
