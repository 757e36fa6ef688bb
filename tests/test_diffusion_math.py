"""Schedules, forward-process closed forms, parameterisations and the loss, in float64."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives as obj
from ldm_jax.diffusion import schedules as sch


@pytest.fixture(autouse=True, scope="module")
def x64():
    # Scoped to this module so other test files keep the float32 default.
    with jax.enable_x64(True):
        yield


def f64_schedule(kind="linear", T=1000, **kw):
    return sch.make_schedule(kind, T, dtype=jnp.float64, **kw)


def rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape)


# ---------------------------------------------------------------- betas

def test_linear_betas():
    b = sch.make_betas("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, abs=1e-15) and b[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=1e-9)
    b2 = sch.make_betas("linear", 200, beta_start=5e-4, beta_end=0.1)
    assert b2[0] == pytest.approx(5e-4) and b2[-1] == pytest.approx(0.1)


def test_scaled_linear_betas():
    b = sch.make_betas("scaled_linear", 1000)
    assert b[0] == pytest.approx(0.00085, rel=1e-12) and b[-1] == pytest.approx(0.012, rel=1e-12)
    # Linear in sqrt(beta), hence not linear in beta.
    np.testing.assert_allclose(np.diff(np.sqrt(b)),
                               (math.sqrt(0.012) - math.sqrt(0.00085)) / 999, rtol=1e-9)
    assert np.all(np.diff(b) > 0)
    assert np.ptp(np.diff(b)) > 1e-8


def test_cosine_betas_follow_alpha_bar_formula():
    T, s = 1000, 0.008
    b = sch.make_betas("cosine", T)
    assert np.all(np.diff(b) > 0) and np.all(b > 0) and b.max() <= 0.999
    assert b[-1] == pytest.approx(0.999)  # the final step hits the clip
    f = lambda t: np.cos((t / T + s) / (1 + s) * np.pi / 2) ** 2
    t = np.arange(1, T + 1)
    ab_expected = f(t) / f(0)
    ab = np.cumprod(1 - b)
    unclipped = b < 0.999
    # Every step before the first clipped one reproduces alpha_bar exactly.
    n_ok = np.argmin(unclipped) if not unclipped.all() else T
    np.testing.assert_allclose(ab[:n_ok], ab_expected[:n_ok], rtol=1e-10)
    b_small = sch.make_betas("cosine", 50, max_beta=0.5)
    assert b_small.max() == 0.5


def test_all_kinds_monotone_and_in_range():
    for kind in sch.BETA_KINDS:
        b = sch.make_betas(kind, 300)
        assert b.shape == (300,) and np.all((b > 0) & (b < 1)) and np.all(np.diff(b) > 0)


def test_unknown_kind_raises_with_names():
    with pytest.raises(ValueError) as e:
        sch.make_betas("quadratic", 10)
    for name in ("linear", "scaled_linear", "cosine"):
        assert name in str(e.value)


# ------------------------------------------------------------- schedule

def test_schedule_fields():
    b = sch.make_betas("linear", 1000)
    s = sch.Schedule.from_betas(b, dtype=jnp.float64)
    assert s.num_timesteps == 1000
    ab = np.cumprod(1 - b)
    np.testing.assert_allclose(s.alphas_cumprod, ab, rtol=1e-14)
    np.testing.assert_allclose(s.alphas_cumprod_prev, np.concatenate([[1.0], ab[:-1]]), rtol=1e-14)
    np.testing.assert_allclose(s.sqrt_alphas_cumprod ** 2, ab, rtol=1e-13)
    np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod ** 2, 1 - ab, rtol=1e-13)
    assert float(s.posterior_variance[0]) == 0.0
    assert np.all(np.isfinite(s.posterior_log_variance_clipped))
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(s.posterior_variance[1:]))
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    # Default dtype is float32; the schedule is a pytree of arrays.
    s32 = sch.Schedule.from_betas(b)
    assert s32.alphas_cumprod.dtype == jnp.float32
    assert len(jax.tree_util.tree_leaves(s32)) == 9


def test_q_sample_and_snr():
    s = f64_schedule()
    x0, noise = rand(0, (5, 3, 4, 4)), rand(1, (5, 3, 4, 4))
    t = jnp.array([0, 10, 500, 998, 999])
    xt = sch.q_sample(s, x0, t, noise)
    ab = np.cumprod(1 - sch.make_betas("linear", 1000))[np.asarray(t)][:, None, None, None]
    np.testing.assert_allclose(xt, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise, rtol=1e-12)
    np.testing.assert_allclose(sch.snr(s, t), ab[:, 0, 0, 0] / (1 - ab[:, 0, 0, 0]), rtol=1e-12)


@pytest.mark.parametrize("kind", sch.BETA_KINDS)
def test_q_posterior_is_bayes_product(kind):
    s = f64_schedule(kind)
    b = np.asarray(s.betas)
    ab = np.cumprod(1 - b)
    x0, xt = rand(2, (4, 6)), rand(3, (4, 6))
    t = np.array([1, 2, 400, 999])
    mean, var, logvar = sch.q_posterior(s, x0, xt, jnp.asarray(t))
    # Prior q(x_{t-1}|x0) = N(sqrt(ab_{t-1}) x0, 1-ab_{t-1}); likelihood
    # q(x_t|x_{t-1}) = N(sqrt(a_t) x_{t-1}, b_t) seen as a Gaussian in x_{t-1}
    # with mean x_t/sqrt(a_t) and variance b_t/a_t. Combine precisions.
    a_t, b_t, abp = (1 - b[t])[:, None], b[t][:, None], ab[t - 1][:, None]
    prec = 1 / (1 - abp) + a_t / b_t
    exp_mean = (np.sqrt(abp) * x0 / (1 - abp) + (xt / np.sqrt(a_t)) * a_t / b_t) / prec
    np.testing.assert_allclose(mean, exp_mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(var[:, 0], 1 / prec[:, 0], rtol=1e-10)
    np.testing.assert_allclose(logvar[:, 0], np.log(1 / prec[:, 0]), rtol=1e-10)
    # t = 0: the posterior collapses onto x0.
    mean0, var0, _ = sch.q_posterior(s, x0, xt, jnp.zeros(4, jnp.int32))
    np.testing.assert_allclose(mean0, x0, atol=1e-14)
    assert np.all(np.asarray(var0) == 0)


# ------------------------------------------------------ parameterisations

@pytest.mark.parametrize("kind", sch.BETA_KINDS)
@pytest.mark.parametrize("param", obj.PARAMETERIZATIONS)
def test_conversions_round_trip(kind, param):
    s = f64_schedule(kind)
    x0, eps = rand(4, (6, 2, 3)), rand(5, (6, 2, 3))
    t = jnp.array([0, 1, 250, 500, 900, 990])
    xt = sch.q_sample(s, x0, t, eps)
    out = obj.training_target(s, param, x0, eps, t)
    x0_hat, eps_hat = obj.to_x0_and_eps(s, param, xt, t, out)
    np.testing.assert_allclose(x0_hat, x0, atol=1e-11)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-11)


def test_v_target_formula():
    s = f64_schedule("cosine")
    x0, eps = rand(6, (3, 5)), rand(7, (3, 5))
    t = jnp.array([3, 300, 700])
    ab = np.asarray(s.alphas_cumprod)[np.asarray(t)][:, None]
    v = obj.training_target(s, "v", x0, eps, t)
    np.testing.assert_allclose(v, np.sqrt(ab) * eps - np.sqrt(1 - ab) * x0, rtol=1e-12)
    assert np.array_equal(obj.training_target(s, "eps", x0, eps, t), eps)
    assert np.array_equal(obj.training_target(s, "x0", x0, eps, t), x0)


def test_bad_parameterization_raises_with_names():
    s = f64_schedule()
    x, t = jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32)
    for call in (lambda: obj.to_x0_and_eps(s, "score", x, t, x),
                 lambda: obj.training_target(s, "score", x, x, t),
                 lambda: obj.diffusion_loss(lambda a, b: a, s, x, jax.random.PRNGKey(0), "score")):
        with pytest.raises(ValueError) as e:
            call()
        for name in ("eps", "x0", "v"):
            assert repr(name) in str(e.value)
    with pytest.raises(ValueError) as e:
        obj.diffusion_loss(lambda a, b: a, s, x, jax.random.PRNGKey(0), weighting="p2")
    assert "min_snr" in str(e.value) and "none" in str(e.value)


# -------------------------------------------------------------- weights

def test_min_snr_weights_closed_form():
    snr_t = jnp.array([1e-4, 0.5, 4.999, 5.0, 20.0, 1e4])
    g = 5.0
    m = np.minimum(np.asarray(snr_t), g)
    np.testing.assert_allclose(obj.loss_weight(snr_t, "eps", "min_snr", g), m / snr_t, rtol=1e-12)
    np.testing.assert_allclose(obj.loss_weight(snr_t, "x0", "min_snr", g), m, rtol=1e-12)
    np.testing.assert_allclose(obj.loss_weight(snr_t, "v", "min_snr", g), m / (snr_t + 1), rtol=1e-12)
    for p in obj.PARAMETERIZATIONS:
        assert np.all(np.asarray(obj.loss_weight(snr_t, p, "none")) == 1.0)
    # Limits stay finite.
    for p in obj.PARAMETERIZATIONS:
        assert np.all(np.isfinite(obj.loss_weight(jnp.array([0.0, jnp.inf]), p, "min_snr", g)))
        assert np.all(np.isfinite(obj.loss_weight(jnp.array([1e-30, 1e30]), p, "truncated_snr")))


@pytest.mark.parametrize("weighting", ["min_snr", "truncated_snr"])
def test_weights_agree_across_parameterizations(weighting):
    # The same prediction error must get the same weighted loss whichever
    # quantity the network outputs (weights are defined in x0-space).
    s = f64_schedule("cosine")
    x0, eps, err = rand(8, (5, 7)), rand(9, (5, 7)), 0.1 * rand(10, (5, 7))
    t = jnp.array([0, 100, 400, 700, 950])
    xt = sch.q_sample(s, x0, t, eps)
    x0_wrong = x0 + err
    losses = []
    for p in obj.PARAMETERIZATIONS:
        ab = sch.extract(s.alphas_cumprod, t, xt.shape)
        sa, s1a = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        eps_wrong = obj.eps_from_x0(xt, x0_wrong, sa, s1a)
        pred = obj.output_from_x0_eps(p, x0_wrong, eps_wrong, sa, s1a)
        target = obj.training_target(s, p, x0, eps, t)
        w = obj.loss_weight(sch.snr(s, t), p, weighting)
        losses.append(w * np.mean((pred - target) ** 2, axis=1))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-8)
    np.testing.assert_allclose(losses[2], losses[1], rtol=1e-8)


# ----------------------------------------------------------------- loss

def _oracle(s, x0, param):
    # Knows the data batch, so it can invert q_sample exactly.
    def apply(xt, t):
        ab = sch.extract(s.alphas_cumprod, t, xt.shape)
        sa, s1a = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        eps = obj.eps_from_x0(xt, x0, sa, s1a)
        return obj.output_from_x0_eps(param, x0, eps, sa, s1a)
    return apply


@pytest.mark.parametrize("param", obj.PARAMETERIZATIONS)
@pytest.mark.parametrize("weighting", obj.WEIGHTINGS)
def test_oracle_loss_is_zero(param, weighting):
    s = f64_schedule("cosine")
    x0 = jnp.asarray(rand(11, (8, 2, 4, 4)))
    loss, per = obj.diffusion_loss(_oracle(s, x0, param), s, x0, jax.random.PRNGKey(3),
                                   param, weighting)
    assert per.shape == (8,) and loss.shape == ()
    assert float(loss) < 1e-18


def test_zero_model_loss_values():
    s = f64_schedule()
    x0 = jnp.asarray(rand(12, (16, 3, 2, 2)))
    seen = {}

    def zero(xt, t):
        seen["xt"], seen["t"] = xt, t
        return jnp.zeros_like(xt)

    rng = jax.random.PRNGKey(7)
    # x0 target, no weights: per-example loss is the data's mean square.
    loss, per = obj.diffusion_loss(zero, s, x0, rng, "x0")
    ms = np.mean(np.asarray(x0).reshape(16, -1) ** 2, axis=1)
    np.testing.assert_allclose(per, ms, rtol=1e-12)
    assert float(loss) == pytest.approx(ms.mean(), rel=1e-12)
    t = np.asarray(seen["t"])
    assert seen["t"].shape == (16,) and seen["t"].dtype == jnp.int32
    assert t.min() >= 0 and t.max() < 1000 and len(set(t.tolist())) > 8
    # min-SNR on the x0 target multiplies by min(snr, gamma).
    _, per = obj.diffusion_loss(zero, s, x0, rng, "x0", "min_snr", snr_gamma=5.0)
    snr_t = np.asarray(sch.snr(s, jnp.asarray(t)))
    np.testing.assert_allclose(per, np.minimum(snr_t, 5.0) * ms, rtol=1e-12)
    # eps target: the loss is the mean square of the noise actually drawn.
    _, per = obj.diffusion_loss(zero, s, x0, rng, "eps")
    ab = np.asarray(s.alphas_cumprod)[t][:, None, None, None]
    noise = (np.asarray(seen["xt"]) - np.sqrt(ab) * np.asarray(x0)) / np.sqrt(1 - ab)
    np.testing.assert_allclose(per, np.mean(noise.reshape(16, -1) ** 2, axis=1), rtol=1e-9)
    # Same rng -> same t and noise; a different rng -> different t.
    obj.diffusion_loss(zero, s, x0, jax.random.PRNGKey(8), "eps")
    assert not np.array_equal(np.asarray(seen["t"]), t)


def test_loss_is_float32_for_bf16_model():
    s = sch.make_schedule("linear", 100)
    x0 = jnp.ones((4, 3), jnp.bfloat16)
    loss, per = obj.diffusion_loss(lambda xt, t: jnp.zeros_like(xt, jnp.bfloat16), s, x0,
                                   jax.random.PRNGKey(0), "x0")
    assert loss.dtype == jnp.float32 and per.dtype == jnp.float32
    assert float(loss) == pytest.approx(1.0)
    # Differentiable and jittable with the model output as a function of params.
    g = jax.jit(jax.grad(lambda w: obj.diffusion_loss(
        lambda xt, t: (w * xt).astype(jnp.bfloat16), s, x0, jax.random.PRNGKey(0))[0]))(1.0)
    assert np.isfinite(float(g))


# ------------------------------------------------------ timestep sampling

def test_uniform_timesteps_cover_range_evenly():
    s = f64_schedule("cosine", T=10)
    t = np.asarray(obj.draw_timesteps(s, jax.random.PRNGKey(0), 20000))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 9
    np.testing.assert_allclose(np.bincount(t, minlength=10) / t.size, 0.1, atol=0.01)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_timesteps_match_closed_form_cdf(mean, std):
    # P(t < k) = P(T * sigmoid(u) < k) = Phi((logit(k / T) - mean) / std).
    s = f64_schedule("cosine", T=1000)
    t = np.asarray(obj.draw_timesteps(s, jax.random.PRNGKey(1), 50000, "logit_normal", mean, std))
    assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= 999
    for k in (100, 250, 500, 750, 900):
        z = (math.log(k / (1000 - k)) - mean) / std
        expected = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        assert np.mean(t < k) == pytest.approx(expected, abs=0.01), k


def test_logit_normal_concentrates_on_middle_and_clips_to_range():
    s = f64_schedule("cosine", T=1000)
    key = jax.random.PRNGKey(2)
    middle = lambda t: np.mean((t >= 250) & (t < 750))
    uni = np.asarray(obj.draw_timesteps(s, key, 20000))
    ln = np.asarray(obj.draw_timesteps(s, key, 20000, "logit_normal"))
    assert middle(uni) == pytest.approx(0.5, abs=0.02) and middle(ln) > 0.7
    wide = np.asarray(obj.draw_timesteps(s, key, 20000, "logit_normal", 0.0, 50.0))
    assert wide.min() == 0 and wide.max() == 999


def test_unknown_timestep_sampling_raises_with_names():
    with pytest.raises(ValueError) as e:
        obj.draw_timesteps(f64_schedule(), jax.random.PRNGKey(0), 4, "beta")
    assert "logit_normal" in str(e.value) and "uniform" in str(e.value)
