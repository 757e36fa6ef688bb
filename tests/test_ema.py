"""The train step's EMA of the params equals a float64 hand computation, step by step.

ema_0 = params_0 and ema_k = decay * ema_{k-1} + (1 - decay) * params_k, where params_k are the
params *after* step k. decay 0.9 (not the 0.99.. of real runs) makes every term visible in a
few steps, so swapped weights, averaging the params from before the step, or copying the params
into the EMA all miss the hand values by far more than float32 rounding. The decay is fixed
(training.ema_warmup="none"); test_ema_warmup.py covers the warm-up schedules.
"""
import jax
import numpy as np

from conftest import tiny_config
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer

DECAY = 0.9
SIZE = 8  # batches are made here, not loaded: small images and a one-level U-Net keep it quick
BATCHES = [np.random.default_rng(10 + i).uniform(-1, 1, (8, SIZE, SIZE, 3)).astype(np.float32)
           for i in range(3)]


def _host(tree):
    """float64 copies on the host (independent of any device buffer)."""
    return [np.array(leaf, dtype=np.float64) for leaf in jax.tree_util.tree_leaves(tree)]


def _names(tree):
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_ema_matches_hand_computation():
    config = tiny_config("", **{"training.ema_decay": DECAY, "training.ema_warmup": "none",
                                "optimizer.warmup_steps": 0,
                                "optimizer.lr": 1e-3, "data.image_size": SIZE,
                                "model.channel_mult": (1,), "model.attention_resolutions": ()})
    model = ddpm_stage.build_model(config)
    schedule = ddpm_stage.build_schedule(config)
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    state = jax.jit(lambda k: ddpm_stage.init_state(config, model, tx, k))(jax.random.PRNGKey(0))
    step = jax.jit(ddpm_stage.make_train_step(config, model, schedule, tx, lr_fn))  # no donation

    names = _names(state.params)
    assert _names(state.ema_params) == names
    params = [_host(state.params)]
    hand = [p.copy() for p in params[0]]
    for got, want in zip(_host(state.ema_params), hand):
        np.testing.assert_array_equal(got, want)  # ema_0 = params_0 exactly

    for k, batch in enumerate(BATCHES, start=1):
        state, metrics = step(state, {"image": batch})
        assert np.isclose(float(metrics["lr"]), 1e-3)  # no warm-up: the first step moves
        params.append(_host(state.params))
        prev_hand = hand
        hand = [DECAY * e + (1.0 - DECAY) * p for e, p in zip(prev_hand, params[k])]
        got = _host(state.ema_params)
        for name, g, h in zip(names, got, hand):
            np.testing.assert_allclose(g, h, rtol=1e-6, atol=1e-7,
                                       err_msg=f"EMA of {name} after step {k}")

        # The hand values are informative: the params moved this step, so an EMA of the
        # pre-step params, a swapped decay or a copy of the params would all be off.
        moved = [n for n, a, b in zip(names, params[k], params[k - 1]) if not np.array_equal(a, b)]
        assert moved, f"no param changed in step {k}"
        for name, g, p_now, p_before, e_before in zip(names, got, params[k], params[k - 1],
                                                      prev_hand):
            if name not in moved:
                continue
            gap = np.abs(p_now - p_before).max()
            assert gap > 1e-5, (name, k, gap)
            # ...and each of those alternatives differs from the hand value by >> the tolerance.
            assert np.abs(g - p_now).max() > 100 * (1e-7 + 1e-6 * np.abs(p_now).max()), (name, k)
            swapped = (1.0 - DECAY) * e_before + DECAY * p_now
            stale = DECAY * e_before + (1.0 - DECAY) * p_before
            assert np.abs(g - swapped).max() > 100 * 1e-7, (name, k)
            assert np.abs(g - stale).max() > 10 * 1e-7, (name, k)

    # By step 3 gradients reach the whole network (the zero-initialised output layer has moved),
    # so most leaves moved away from their initial values and the EMA lags behind them.
    moved_total = [not np.array_equal(a, b) for a, b in zip(params[-1], params[0])]
    assert np.mean(moved_total) > 0.9, np.mean(moved_total)
    lag = [np.abs(g - p).max() for g, p, m in zip(_host(state.ema_params), params[-1], moved_total)
           if m]
    assert min(lag) > 0

