"""The train loop learns, and stopping then resuming gives exactly the uninterrupted run."""
import json
import os
import shutil

import jax
import numpy as np

from conftest import tensorboard_steps, tiny_config
from ldm_jax import generate, parallel
from ldm_jax.checkpoint import CHECKPOINT_DIR
from ldm_jax.training import ddpm_stage
from ldm_jax.training.loop import train
from ldm_jax.training.optimizer import make_optimizer


def _losses(history):
    return [(h["step"], h["loss"]) for h in history]


def test_overfits_one_batch():
    """x0-prediction of one repeated image is learnable at every noise level: loss must fall 10x."""
    config = tiny_config("", **{"diffusion.parameterization": "x0", "model.dropout": 0.0,
                                "optimizer.lr": 3e-3, "optimizer.warmup_steps": 0,
                                "optimizer.grad_clip": 0.0})
    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, 200)
    state = jax.jit(lambda k: ddpm_stage.init_state(config, model, tx, k))(jax.random.PRNGKey(0))
    step = jax.jit(ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn))
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    image = np.stack([yy, xx, yy * xx], -1).astype(np.float32) * 2 - 1
    batch = {"image": np.repeat(image[None], 8, axis=0)}
    losses = []
    for _ in range(150):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    first, last = np.mean(losses[:5]), np.mean(losses[-10:])
    assert last < first / 10, (first, last)


def test_resume_matches_uninterrupted_run(tmp_path, shapes_data_dir):
    config = tiny_config(shapes_data_dir, **{"training.num_steps": 6})
    straight = train(config, str(tmp_path / "straight"))
    assert [s for s, _ in _losses(straight)] == [1, 2, 3, 4, 5, 6]

    resumed_dir = str(tmp_path / "resumed")
    first = train(config, resumed_dir, stop_at=4)  # pre-empted after step 4 (checkpoints 2 and 4)
    assert [s for s, _ in _losses(first)] == [1, 2, 3, 4]
    # As if killed after logging step 4 but before its checkpoint was complete.
    shutil.rmtree(os.path.join(resumed_dir, CHECKPOINT_DIR, "4"))
    second = train(config, resumed_dir)
    assert [s for s, _ in _losses(second)] == [3, 4, 5, 6]
    # Same data order, noise, dropout and optimiser state: bit-identical losses.
    assert _losses(first)[:2] + _losses(second) == _losses(straight)

    # Steps 3 and 4 were logged twice; the records of the stopped run past its checkpoint are
    # gone from metrics.jsonl and hidden from TensorBoard.
    with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert [(r["step"], r["loss"]) for r in logged] == _losses(straight)
    assert tensorboard_steps(os.path.join(resumed_dir, "tensorboard"), "train/loss") == \
        [1, 2, 3, 4, 5, 6]
    assert os.path.exists(os.path.join(resumed_dir, "config.json"))

    # So is the EMA: its warm-up (compvis, decay (1+n)/(10+n) here) counts updates from the
    # checkpointed step, so a count restarted at the resume would weigh steps 3-6 differently.
    mesh = parallel.make_mesh()
    emas = [generate.load_params(d, config, mesh, use_ema=True)[1]
            for d in (str(tmp_path / "straight"), resumed_dir)]
    raw = generate.load_params(resumed_dir, config, mesh, use_ema=False)[1]
    pairs = zip(*(jax.tree_util.tree_leaves(t) for t in (*emas, raw)))
    assert all(np.array_equal(a, b) for a, b, _ in pairs)
    assert any(not np.array_equal(a, r) for a, r in zip(jax.tree_util.tree_leaves(emas[1]),
                                                        jax.tree_util.tree_leaves(raw)))


def test_training_writes_sample_grid(tmp_path, shapes_data_dir):
    from PIL import Image
    config = tiny_config(shapes_data_dir, **{"training.num_steps": 2, "training.sample_every": 2,
                                             "training.num_samples": 4})
    train(config, str(tmp_path))
    path = tmp_path / "samples" / "step_00000002.png"
    with Image.open(path) as img:
        assert img.size == (2 + 2 * 34, 2 + 2 * 34)  # 2x2 grid of 32px images, 2px padding
