"""VectorQuantizer: assignment, straight-through gradient, losses (legacy and not), perplexity,
the EMA codebook update and dead-code restarts, against numpy hand computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.quantizer import VectorQuantizer, code_statistics


def rand(seed, shape, scale=1.0):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def brute_force(z, codebook):
    flat = np.asarray(z, np.float64).reshape(-1, codebook.shape[1])
    d = ((flat[:, None, :] - np.asarray(codebook, np.float64)[None]) ** 2).sum(-1)
    return d.argmin(1), flat


def with_codebook(vq, z, codebook):
    variables = vq.init(jax.random.PRNGKey(0), z)
    return {"params": {"embedding": jnp.asarray(codebook)}}, variables


def test_init_is_uniform_in_one_over_n_e():
    vq = VectorQuantizer(n_e=64, e_dim=8)
    cb = np.asarray(vq.init(jax.random.PRNGKey(1), jnp.zeros((1, 2, 2, 8)))["params"]["embedding"])
    assert cb.shape == (64, 8)
    assert np.abs(cb).max() <= 1 / 64 and cb.std() == pytest.approx(1 / 64 / np.sqrt(3), rel=0.1)


def test_nearest_code_matches_brute_force():
    vq = VectorQuantizer(n_e=16, e_dim=4)
    z = rand(0, (2, 3, 5, 4))
    cb = rand(1, (16, 4))
    variables, _ = with_codebook(vq, z, cb)
    zq, _, info = vq.apply(variables, z)
    want, _ = brute_force(z, cb)
    assert info["indices"].shape == (2, 3, 5)
    np.testing.assert_array_equal(np.asarray(info["indices"]).ravel(), want)
    np.testing.assert_allclose(np.asarray(zq).reshape(-1, 4), cb[want], atol=1e-6)


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(n_e=8, e_dim=3)
    z = rand(2, (1, 2, 2, 3))
    variables, _ = with_codebook(vq, z, rand(3, (8, 3)))
    jac = jax.jacobian(lambda zz: vq.apply(variables, zz)[0])(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(jac).reshape(12, 12), np.eye(12), atol=1e-7)


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_value_and_which_term_beta_weights(legacy):
    beta = 0.25
    vq = VectorQuantizer(n_e=8, e_dim=3, beta=beta, legacy=legacy)
    z = rand(4, (2, 2, 3, 3))
    cb = rand(5, (8, 3))
    variables, _ = with_codebook(vq, z, cb)
    idx, flat = brute_force(z, cb)
    diff = cb[idx] - flat                          # e_k - z
    n = diff.size
    mse = np.mean(diff ** 2)
    loss = float(vq.apply(variables, z)[1])
    assert loss == pytest.approx((1 + beta) * mse, rel=1e-5)  # both terms have the value mse

    # Gradients tell the forms apart: commitment -> z, codebook -> embedding.
    w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
    gz = jax.grad(lambda zz: vq.apply(variables, zz)[1])(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(gz).reshape(-1, 3), w_commit * 2 * (-diff) / n,
                               rtol=1e-4, atol=1e-7)
    gcb = jax.grad(lambda cbk: vq.apply({"params": {"embedding": cbk}}, z)[1])(jnp.asarray(cb))
    want = np.zeros_like(cb, dtype=np.float64)
    np.add.at(want, idx, w_code * 2 * diff / n)
    np.testing.assert_allclose(np.asarray(gcb), want, rtol=1e-4, atol=1e-7)


def test_perplexity_and_usage_for_known_assignments():
    vq = VectorQuantizer(n_e=8, e_dim=2)
    cb = np.array([[i, -i] for i in range(8)], np.float32) * 10.0
    # Uniform use of k = 4 codes -> perplexity 4, usage 4/8.
    z = np.repeat(cb[[1, 3, 4, 6]], 3, axis=0).reshape(1, 3, 4, 2) + 0.1
    variables, _ = with_codebook(vq, z, cb)
    _, _, info = vq.apply(variables, z)
    assert float(info["perplexity"]) == pytest.approx(4.0, rel=1e-5)
    assert float(info["usage"]) == pytest.approx(0.5)
    # counts (2, 1, 1): p = (.5, .25, .25), exp(entropy) = 2^1.5.
    _, perp, usage = code_statistics(jnp.array([0, 0, 5, 7]), 8)
    assert float(perp) == pytest.approx(2 ** 1.5, rel=1e-5) and float(usage) == pytest.approx(3 / 8)


def ema_setup(restart, seed=6, n_e=8, e_dim=3, steps=100):
    vq = VectorQuantizer(n_e=n_e, e_dim=e_dim, beta=0.25, ema=True, decay=0.9, eps=1e-5,
                         restart_dead_codes=restart, dead_code_threshold=0.5)
    z = rand(seed, (2, 3, 4, e_dim))
    variables = vq.init(jax.random.PRNGKey(0), z)
    assert "params" not in variables  # the EMA codebook is not trained by gradient
    emb = rand(seed + 1, (n_e, e_dim))
    # Codes 0..3 used before, 4..7 never (cluster size 0).
    cluster = np.array([3.0, 2.0, 4.0, 1.0, 0, 0, 0, 0], np.float32)[:n_e]
    stats = {"embedding": jnp.asarray(emb), "cluster_size": jnp.asarray(cluster),
             "embed_avg": jnp.asarray(emb * (cluster[:, None] + 1.0)),
             "steps": jnp.asarray(steps, jnp.int32)}
    return vq, z, {"vq_stats": stats}


def ema_by_hand(z, stats, d=0.9, eps=1e-5):
    emb = np.asarray(stats["embedding"], np.float64)
    idx, flat = brute_force(z, emb)
    k = emb.shape[0]
    counts = np.bincount(idx, minlength=k)
    embed_sum = np.zeros_like(emb)
    np.add.at(embed_sum, idx, flat)
    cluster = d * np.asarray(stats["cluster_size"], np.float64) + (1 - d) * counts
    avg = d * np.asarray(stats["embed_avg"], np.float64) + (1 - d) * embed_sum
    n = cluster.sum()
    smoothed = (cluster + eps) / (n + k * eps) * n
    return idx, flat, cluster, avg, avg / smoothed[:, None], smoothed


def test_ema_update_one_step_matches_hand_computation():
    vq, z, variables = ema_setup(restart=False)
    (zq, loss, info), upd = vq.apply(variables, z, train=True, mutable=["vq_stats"])
    idx, flat, cluster, avg, emb, _ = ema_by_hand(z, variables["vq_stats"])
    assert len(set(idx)) < 8  # some code unused: its row takes the no-debias blow-up
    np.testing.assert_array_equal(np.asarray(info["indices"]).ravel(), idx)
    s = upd["vq_stats"]
    np.testing.assert_allclose(s["cluster_size"], cluster, rtol=1e-5)
    np.testing.assert_allclose(s["embed_avg"], avg, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s["embedding"], emb, rtol=1e-4)
    assert int(s["steps"]) == 101
    # Quantised with the codebook from before the update; loss = beta * commitment.
    old = np.asarray(variables["vq_stats"]["embedding"], np.float64)
    np.testing.assert_allclose(np.asarray(zq).reshape(-1, 3), old[idx], atol=1e-6)
    assert float(loss) == pytest.approx(0.25 * np.mean((old[idx] - flat) ** 2), rel=1e-5)
    # Eval mode and immutable calls leave the statistics alone.
    _, upd_eval = vq.apply(variables, z, train=False, mutable=["vq_stats"])
    np.testing.assert_array_equal(upd_eval["vq_stats"]["embedding"],
                                  variables["vq_stats"]["embedding"])


def test_dead_code_restart_replaces_exactly_the_dead_codes():
    vq, z, variables = ema_setup(restart=True)
    rngs = {"vq_restart": jax.random.PRNGKey(7)}
    (_, _, info), upd = vq.apply(variables, z, train=True, mutable=["vq_stats"], rngs=rngs)
    idx, flat, cluster, avg, emb, smoothed = ema_by_hand(z, variables["vq_stats"])
    debiased = cluster / (1 - 0.9 ** 101)
    dead = debiased < 0.5
    assert 0 < dead.sum() < 8  # both kinds present
    s = upd["vq_stats"]
    got = np.asarray(s["embedding"], np.float64)
    # Alive codes: the plain EMA update.
    np.testing.assert_allclose(got[~dead], emb[~dead], rtol=1e-4)
    # Dead codes: each is one of this batch's encoder outputs, and the stored average agrees.
    for k in np.flatnonzero(dead):
        dist = np.abs(flat - got[k]).max(axis=1)
        assert dist.min() < 1e-6, f"code {k} is not an encoder output"
        np.testing.assert_allclose(np.asarray(s["embed_avg"])[k], got[k] * smoothed[k],
                                   rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(s["cluster_size"], cluster, rtol=1e-5)
    # The draw comes from the rng.
    _, upd2 = vq.apply(variables, z, train=True, mutable=["vq_stats"],
                       rngs={"vq_restart": jax.random.PRNGKey(8)})
    assert not np.allclose(np.asarray(upd2["vq_stats"]["embedding"])[dead], got[dead])


def test_restart_needs_ema():
    vq = VectorQuantizer(n_e=4, e_dim=2, restart_dead_codes=True)
    with pytest.raises(ValueError, match="ema=True"):
        vq.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 2)))


def test_wrong_channel_count_is_explained():
    with pytest.raises(ValueError, match="e_dim=4"):
        VectorQuantizer(n_e=4, e_dim=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 3)))
