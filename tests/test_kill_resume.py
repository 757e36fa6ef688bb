"""A training process killed with SIGKILL in the middle of an (async) checkpoint save leaves the
previous checkpoint usable, and resuming continues the run exactly, logging each step once."""
import json
import os
import subprocess
import sys
import time

from conftest import ROOT, tiny_cli_args, tiny_config
from ldm_jax.checkpoint import CHECKPOINT_DIR, Checkpointer
from ldm_jax.training.loop import train

# A wider model than the other tests so that each save takes long enough to be caught mid-write.
OVERRIDES = {"training.num_steps": 14, "training.checkpoint_every": 1, "model.base_channels": 32}


def _kill_during_save(workdir, data_dir):
    proc = subprocess.Popen([sys.executable, "train.py", "--config=configs/ddpm_shapes.py",
                             f"--workdir={workdir}", *tiny_cli_args(data_dir, **OVERRIDES)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        complete = [n for n in names if n.isdigit()]
        in_flight = [n for n in names if "tmp" in n]
        if len(complete) >= 2 and in_flight:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait()
            return sorted(int(n) for n in complete), in_flight
        time.sleep(0.0005)
    proc.kill()
    raise AssertionError(f"never caught a save in flight; rc={proc.returncode} "
                         f"stderr={proc.stderr.read().decode()[-2000:]}")


def test_sigkill_during_save_then_resume(tmp_path, shapes_data_dir):
    workdir = str(tmp_path / "killed")
    complete, in_flight = _kill_during_save(workdir, shapes_data_dir)
    in_flight_step = int(in_flight[0].split(".")[0])

    # The save seen in flight may have completed between the listing and the kill: then it is
    # a legitimate latest step. Otherwise the latest is the newest step listed as complete.
    latest = Checkpointer(workdir, read_only=True).latest_step()
    assert latest in set(complete) | {in_flight_step}, (latest, complete, in_flight)
    assert latest >= max(complete)

    config = tiny_config(shapes_data_dir, **OVERRIDES)
    resumed = train(config, workdir)
    assert resumed[0]["step"] == latest + 1 and resumed[-1]["step"] == 14
    straight = train(config, str(tmp_path / "straight"))
    expected = {h["step"]: h["loss"] for h in straight}
    assert [(h["step"], h["loss"]) for h in resumed] == \
        [(h["step"], expected[h["step"]]) for h in resumed]

    # Records the killed run wrote past its checkpoint were dropped: each step once, and the
    # logged losses are the uninterrupted run's.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, 15))
    assert [r["loss"] for r in records] == [h["loss"] for h in straight]
    # The kill's half-written folder was cleaned up when the workdir was opened again.
    assert not [n for n in os.listdir(os.path.join(workdir, CHECKPOINT_DIR)) if "tmp" in n]


def test_readers_leave_unfinished_saves_alone_and_the_writer_removes_them(tmp_path):
    """A reader (sample.py while training runs) must not delete a save in flight; opening the
    workdir to train removes what a killed save left, before returning, so nothing races it."""
    ckpt_dir = tmp_path / CHECKPOINT_DIR
    unfinished = ckpt_dir / "7.orbax-checkpoint-tmp"
    (unfinished / "state").mkdir(parents=True)
    (ckpt_dir / "5").mkdir()
    for _ in range(2):
        Checkpointer(str(tmp_path), read_only=True).latest_step()
    assert unfinished.is_dir()
    Checkpointer(str(tmp_path))
    Checkpointer(str(tmp_path))  # a second writer finds nothing left to delete, and no error
    assert sorted(os.listdir(ckpt_dir)) == ["5"]
