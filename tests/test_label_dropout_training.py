"""Label dropout for classifier-free guidance, observed through the jitted train step.

The null label (DROPPED = -2) is row 0 of every label table of LabelEmbedding; a row gets a
gradient exactly when some example of the batch uses it. So which rows a step moves tells which
examples had their labels withheld inside that step: an unused row keeps its bits (Adam's update
of a zero gradient, with weight decay 0, is exactly 0), a used one moves. Two labels with a
distinct value per example let every example be traced.
"""
import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from ldm_jax.models.label_embedding import ABSENT, DROPPED
from ldm_jax.training import ddpm_stage
from ldm_jax.training.optimizer import make_optimizer

KEYS = ("position_0", "position_1")  # 9 values each
B = 8
# Example i has position_0 = i and position_1 = (i + 3) % 8: distinct values in each column,
# and value 8 of each label is never used (a row that must never move).
LABELS = np.stack([np.arange(B), (np.arange(B) + 3) % B], axis=1).astype(np.int32)
SIZE = 8  # batches are made here, not loaded, so a small image keeps the steps cheap
IMAGES = [np.random.default_rng(20 + i).uniform(-1, 1, (B, SIZE, SIZE, 3)).astype(np.float32)
          for i in range(6)]
DROP = 0.8  # well away from 0.5, so withholding with 1 - p instead of p shows
OFFSET = -DROPPED  # table row of value v is v + 2, so DROPPED -> 0, ABSENT -> 1


def _config(drop_prob):
    return tiny_config("", **{"model.label_keys": KEYS, "training.label_drop_prob": drop_prob,
                              "model.dropout": 0.0, "optimizer.lr": 2e-3,
                              "optimizer.warmup_steps": 0, "model.channel_mult": (1,),
                              "model.attention_resolutions": (), "data.image_size": SIZE})


def _setup(drop_probs):
    """The model, optimiser and initial state (none depend on label_drop_prob), and one jitted
    train step per drop probability."""
    configs = [_config(p) for p in drop_probs]
    model = ddpm_stage.build_model(configs[0])
    assert model.label_sizes == (9, 9)
    schedule = ddpm_stage.build_schedule(configs[0])
    tx, lr_fn = make_optimizer(configs[0].optimizer, configs[0].training.num_steps)
    state = jax.jit(lambda k: ddpm_stage.init_state(configs[0], model, tx, k))(jax.random.PRNGKey(0))
    steps = [jax.jit(ddpm_stage.make_train_step(c, model, schedule, tx, lr_fn)) for c in configs]
    return model, tx, state, steps


def _tables(params):
    """Host copies of the label tables, one (9 + 2, features) array per label."""
    emb = params["label_embedding"]
    return [np.array(emb[f"label{j}"]["embedding"]) for j in range(len(KEYS))]


def _rows_moved(before, after):
    """(labels, rows) bool: which table rows differ in any bit."""
    return np.stack([(a != b).any(axis=1) for a, b in zip(after, before)])


def _train(step, state):
    for images in IMAGES:
        state, metrics = step(state, {"image": images, "labels": LABELS})
        assert np.isfinite(float(metrics["loss"]))
    return state


def _withheld_fraction(step, tx, start, steps=12):
    """Run `steps` single steps from `start`, each with fresh Adam moments (so a row moves
    exactly when it had a gradient), and read off which examples had their labels withheld."""
    before = _tables(start.params)
    withheld = []
    for s in range(steps):
        state = start.replace(step=jnp.asarray(1000 + s, jnp.int32), opt_state=tx.init(start.params))
        state, _ = step(state, {"image": IMAGES[s % len(IMAGES)], "labels": LABELS})
        moved = _rows_moved(before, _tables(state.params))
        kept = np.stack([moved[j, LABELS[:, j] + OFFSET] for j in range(len(KEYS))])
        # All labels of an example are withheld together, never one label alone.
        np.testing.assert_array_equal(kept[0], kept[1], err_msg=f"step {s}: a row partly dropped")
        # The null row gets a gradient exactly when some example was withheld.
        assert (moved[:, 0] == (~kept[0]).any()).all(), (s, moved[:, 0], kept[0])
        assert not moved[:, ABSENT + OFFSET].any() and not moved[:, 8 + OFFSET].any(), s
        withheld.extend(~kept[0])
    return float(np.mean(withheld))


def test_label_dropout_in_the_train_step():
    model, tx, init, (step_plain, step_drop) = _setup((0.0, DROP))
    initial = _tables(init.params)
    plain = _train(step_plain, init)
    dropped = _train(step_drop, init)

    # (a) Without dropout nothing ever asks for the null label: its row keeps its initial bits.
    # With dropout it is learned. The rows of used values are learned without dropout (and at
    # least some with it); rows of unused values by neither.
    moved_plain = _rows_moved(initial, _tables(plain.params))
    moved_dropped = _rows_moved(initial, _tables(dropped.params))
    used = LABELS.T + OFFSET
    for j in range(len(KEYS)):
        assert not moved_plain[j, 0], f"label{j}: null row moved without label dropout"
        assert moved_dropped[j, 0], f"label{j}: null row never trained with label_drop_prob={DROP}"
        assert moved_plain[j, used[j]].all(), (j, moved_plain[j])
        assert moved_dropped[j, used[j]].any(), (j, moved_dropped[j])
        for moved in (moved_plain, moved_dropped):
            assert not moved[j, ABSENT + OFFSET] and not moved[j, 8 + OFFSET], j
    null_change = [np.abs(t[0] - i[0]).max() for t, i in zip(_tables(dropped.params), initial)]
    assert min(null_change) > 1e-3, null_change  # Adam steps of lr 2e-3, not rounding

    # (b) The dropout-trained network answers the null label differently from a real one, and
    # its trained null row matters: putting the initial row back changes the null output only.
    apply = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, labels=y))
    x = jnp.asarray(IMAGES[0])
    t = jnp.full((B,), 400, jnp.int32)
    real = jnp.asarray(LABELS)
    null = jnp.full_like(real, DROPPED)
    out_cond = np.asarray(apply(dropped.params, x, t, real))
    out_null = np.asarray(apply(dropped.params, x, t, null))
    assert np.abs(out_null - out_cond).mean() > 1e-3, np.abs(out_null - out_cond).mean()
    emb = dict(dropped.params["label_embedding"])
    for j, table in enumerate(_tables(dropped.params)):
        emb[f"label{j}"] = {"embedding": jnp.asarray(table).at[0].set(initial[j][0])}
    reset = {**dropped.params, "label_embedding": emb}
    np.testing.assert_array_equal(apply(reset, x, t, real), out_cond)
    out_null_reset = np.asarray(apply(reset, x, t, null))
    assert np.abs(out_null_reset - out_null).mean() > 1e-5, np.abs(out_null_reset - out_null).mean()

    # (c) The withheld fraction inside the jitted step follows training.label_drop_prob (and
    # not 1 - label_drop_prob), one whole example at a time.
    frac_plain = _withheld_fraction(step_plain, tx, plain)
    frac_drop = _withheld_fraction(step_drop, tx, plain)
    assert frac_plain == 0.0, frac_plain
    assert abs(frac_drop - DROP) < 0.15, frac_drop  # 96 draws: sd 0.04
