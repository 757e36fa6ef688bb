"""DDPM / DDIM samplers against exact oracles and closed-form output moments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import objectives as obj
from ldm_jax.diffusion import schedules as sch
from ldm_jax.diffusion.samplers import ddim_timesteps, sample


def _ab(schedule, t, x):
    return sch.extract(schedule.alphas_cumprod, t, x.shape).astype(x.dtype)


def _roots(schedule, t, x):
    return (sch.extract(schedule.sqrt_alphas_cumprod, t, x.shape).astype(x.dtype),
            sch.extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape).astype(x.dtype))


def delta_oracle(schedule, x_star, param):
    """Exact model for data concentrated on the single point x_star."""
    def model(x, t):
        sa, s1a = _roots(schedule, t, x)
        eps = obj.eps_from_x0(x, x_star, sa, s1a)
        return obj.output_from_x0_eps(param, jnp.broadcast_to(x_star, x.shape), eps, sa, s1a)
    return model


def gaussian_oracle(schedule, mu, s):
    """E[eps | x_t] for data ~ N(mu, s^2) independently per dimension."""
    def model(x, t):
        ab = _ab(schedule, t, x)
        return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * s ** 2 + 1 - ab)
    return model


def toy_net(x, t):
    # Bounded, and nonlinear in x and t so step order and timesteps matter.
    return jnp.tanh(0.7 * x + 0.01 * t[:, None, None].astype(x.dtype)) * (1 + 0.2 * jnp.cos(x))


# ------------------------------------------------------------ timesteps

def test_ddim_timesteps_leading():
    np.testing.assert_array_equal(ddim_timesteps(1000, 50, "leading", 1), np.arange(1, 1000, 20)[::-1])
    np.testing.assert_array_equal(ddim_timesteps(1000, 50, "leading", 0), np.arange(0, 1000, 20)[::-1])
    np.testing.assert_array_equal(ddim_timesteps(1000, 1000, "leading"), np.arange(1000)[::-1])
    # n not dividing T: exactly n steps of T // n (diffusers), unlike CompVis' range().
    np.testing.assert_array_equal(ddim_timesteps(1000, 30, "leading", 1), np.arange(30)[::-1] * 33 + 1)


def test_ddim_timesteps_trailing_and_linspace():
    np.testing.assert_array_equal(ddim_timesteps(1000, 50, "trailing"), np.arange(999, 0, -20))
    np.testing.assert_array_equal(ddim_timesteps(1000, 3, "trailing"), [999, 666, 332])
    np.testing.assert_array_equal(ddim_timesteps(1000, 1, "trailing"), [999])
    np.testing.assert_array_equal(ddim_timesteps(1000, 3, "linspace"), [999, 500, 0])
    np.testing.assert_array_equal(ddim_timesteps(1000, 1, "linspace"), [0])
    # Same values as diffusers' float formulas wherever those have no .5 ties.
    for n in (2, 4, 5, 7, 10, 20, 25, 50, 100, 250, 1000):
        np.testing.assert_array_equal(ddim_timesteps(1000, n, "trailing"),
                                      np.round(np.arange(1000, 0, -1000 / n)).astype(int) - 1)
        np.testing.assert_array_equal(ddim_timesteps(1000, n, "linspace"),
                                      np.round(np.linspace(0, 999, n))[::-1].astype(int))


def test_ddim_timesteps_errors():
    with pytest.raises(ValueError, match="leading"):
        ddim_timesteps(1000, 50, "quadratic")
    with pytest.raises(ValueError):
        ddim_timesteps(100, 101, "trailing")
    with pytest.raises(ValueError):
        ddim_timesteps(100, 100, "leading", steps_offset=1)  # would reach t = 100


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_sampler_visits_ddim_timesteps(spacing, offset):
    s = sch.make_schedule("linear", 100)
    seen = []

    def model(x, t):
        seen.append(int(t[0]))
        assert t.shape == (2,) and t.dtype == jnp.int32
        return jnp.zeros_like(x)

    sample(model, s, jax.random.PRNGKey(0), (2, 3), num_steps=7, spacing=spacing,
           steps_offset=offset, use_python_loop=True)
    np.testing.assert_array_equal(seen, ddim_timesteps(100, 7, spacing, offset))


# ------------------------------------------------- (a) delta data lands on x*

@pytest.mark.parametrize("param,spacing,clip", [("eps", "leading", True), ("x0", "trailing", False),
                                                ("v", "linspace", True)])
def test_ddim_delta_data_lands_on_point(param, spacing, clip):
    s = sch.make_schedule("linear", 1000)
    x_star = jax.random.uniform(jax.random.PRNGKey(1), (3, 4, 4), minval=-0.9, maxval=0.9)
    out = sample(delta_oracle(s, x_star, param), s, jax.random.PRNGKey(2), (8, 3, 4, 4),
                 sampler="ddim", num_steps=50, eta=0.0, parameterization=param,
                 spacing=spacing, clip_denoised=clip)
    np.testing.assert_allclose(out, jnp.broadcast_to(x_star, out.shape), atol=2e-6)


# ------------------------------------------- (b) Gaussian data, exact moments

N_SAMPLES = 4000
T_GAUSS = 200
MU = np.array([-0.5, 0.0, 0.5, 1.0])
STD = np.array([0.2, 0.5, 1.0, 0.3])


def _gauss_schedule():
    # Linear schedule rescaled to T = 200 (x1000/T as in improved DDPM) so
    # that alpha_bar_T ~ 5e-5 and the N(0, I) prior is accurate.
    return sch.make_schedule("linear", T_GAUSS, beta_start=5e-4, beta_end=0.1)


def ddpm_moments(schedule, variance):
    """Exact output mean/std of full-length DDPM with the Gaussian oracle.

    Independent of the sampler code: uses the schedule's posterior
    coefficients and E[x0 | x_t] = mu + sqrt(ab) s^2 / Var(x_t) (x_t - sqrt(ab) mu);
    each step is affine in x_t, so mean and variance propagate exactly.
    """
    ab = np.cumprod(1 - np.asarray(schedule.betas, np.float64))
    b = np.asarray(schedule.betas, np.float64)
    c1 = b * np.sqrt(np.append(1.0, ab[:-1])) / (1 - ab)
    c2 = (1 - np.append(1.0, ab[:-1])) * np.sqrt(1 - b) / (1 - ab)
    post_var = b * (1 - np.append(1.0, ab[:-1])) / (1 - ab)
    m, v = np.zeros_like(MU), np.ones_like(MU)
    for k in range(len(b) - 1, -1, -1):
        a = np.sqrt(ab[k]) * STD ** 2 / (ab[k] * STD ** 2 + 1 - ab[k])
        gain = c1[k] * a + c2[k]
        m = gain * m + c1[k] * (MU - a * np.sqrt(ab[k]) * MU)
        v = gain ** 2 * v + (0.0 if k == 0 else (post_var[k] if variance == "fixed_small" else b[k]))
    return m, np.sqrt(v)


def ddim_moments(schedule, num_steps):
    """Exact output mean/std of deterministic DDIM with the Gaussian oracle.

    DDIM is Euler's method on y = x / sqrt(ab) against sigma = sqrt((1-ab)/ab),
    with dy/dsigma = E[eps|x_t] = sigma (y - mu) / (s^2 + sigma^2).
    """
    ab = np.cumprod(1 - np.asarray(schedule.betas, np.float64))
    ts = ddim_timesteps(len(ab), num_steps, "leading", 0)
    sig = np.append(np.sqrt((1 - ab[ts]) / ab[ts]), 0.0)
    gain = np.ones_like(MU)
    for k in range(num_steps):
        gain = gain * (1 + (sig[k + 1] - sig[k]) * sig[k] / (STD ** 2 + sig[k] ** 2))
    # y starts at x_T / sqrt(ab_top) with x_T ~ N(0, 1).
    return MU * (1 - gain), gain / np.sqrt(ab[ts[0]])


GAUSS_CASES = [
    # (sampler kwargs, how far the exact sampler output std is from s: the
    # samplers' own discretisation bias with T = 200, not sampling noise)
    (dict(sampler="ddpm", num_steps=T_GAUSS, ddpm_variance="fixed_small"), 0.08),
    (dict(sampler="ddpm", num_steps=T_GAUSS, ddpm_variance="fixed_large"), 0.03),
    (dict(sampler="ddim", num_steps=50, eta=0.0), 0.12),
]


@pytest.mark.parametrize("kw,bias", GAUSS_CASES)
def test_gaussian_data_moments(kw, bias):
    s = _gauss_schedule()
    x = sample(gaussian_oracle(s, jnp.asarray(MU, jnp.float32), jnp.asarray(STD, jnp.float32)),
               s, jax.random.PRNGKey(0), (N_SAMPLES, 4), clip_denoised=False, **kw)
    x = np.asarray(x, np.float64)
    if kw["sampler"] == "ddpm":
        m, sd = ddpm_moments(s, kw["ddpm_variance"])
    else:
        m, sd = ddim_moments(s, kw["num_steps"])
    # The output is an affine map of Gaussians, hence Gaussian: the sample
    # mean has standard error sd/sqrt(N) and the sample std sd/sqrt(2N).
    # 4.5 standard errors: a false alarm has probability < 1e-4 over all checks.
    np.testing.assert_array_less(np.abs(x.mean(0) - m), 4.5 * sd / np.sqrt(N_SAMPLES))
    np.testing.assert_array_less(np.abs(x.std(0) - sd), 4.5 * sd / np.sqrt(2 * N_SAMPLES))
    # And the exact sampler moments are close to the data's.
    np.testing.assert_array_less(np.abs(m - MU), 0.01 * STD)
    np.testing.assert_array_less(np.abs(sd / STD - 1), bias)


# ------------------------------------------ (c) DDIM eta=1 == DDPM fixed_small

@pytest.mark.parametrize("spacing,n,float32", [("leading", 100, True), ("trailing", 17, False)])
def test_ddim_eta1_equals_ddpm_fixed_small(spacing, n, float32):
    # Different formulas, same distribution and same noise: equal up to
    # rounding. float32 over 100 steps agrees to ~2e-6 (each is within ~2e-6
    # of a float64 run with the same noise).
    s = sch.make_schedule("linear", 100)
    kw = dict(num_steps=n, spacing=spacing, clip_denoised=True, clip_range=1.5)
    if float32:
        ddim = sample(toy_net, s, jax.random.PRNGKey(5), (6, 2, 3), sampler="ddim", eta=1.0, **kw)
        ddpm = sample(toy_net, s, jax.random.PRNGKey(5), (6, 2, 3), sampler="ddpm",
                      ddpm_variance="fixed_small", **kw)
        np.testing.assert_allclose(ddim, ddpm, atol=5e-6)
    with jax.enable_x64(True):
        s64 = sch.make_schedule("linear", 100, dtype=jnp.float64)
        ddim = sample(toy_net, s64, jax.random.PRNGKey(5), (6, 2, 3), sampler="ddim", eta=1.0,
                      dtype=jnp.float64, **kw)
        ddpm = sample(toy_net, s64, jax.random.PRNGKey(5), (6, 2, 3), sampler="ddpm",
                      dtype=jnp.float64, **kw)
        np.testing.assert_allclose(ddim, ddpm, atol=1e-12)


def test_full_ddpm_is_ddpm_paper_algorithm():
    """num_steps = T, leading, offset 0 == Algorithm 2 of Ho et al. (2020)."""
    T, shape, rng = 60, (5, 2, 3), jax.random.PRNGKey(9)
    with jax.enable_x64(True):
        s = sch.make_schedule("linear", T, dtype=jnp.float64, beta_start=1e-3, beta_end=0.2)
        b = np.asarray(s.betas)
        ab = np.cumprod(1 - b)
        for variance in ("fixed_small", "fixed_large"):
            got = sample(toy_net, s, rng, shape, sampler="ddpm", num_steps=T,
                         ddpm_variance=variance, clip_denoised=False, dtype=jnp.float64)
            # Reference loop, using the sampler's documented noise streams.
            init_rng, step_rng = jax.random.split(rng)
            x = np.asarray(jax.random.normal(init_rng, shape, jnp.float64))
            for i, t in enumerate(range(T - 1, -1, -1)):
                eps = np.asarray(toy_net(jnp.asarray(x), jnp.full((shape[0],), t)))
                z = np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), shape, jnp.float64))
                ab_prev = ab[t - 1] if t > 0 else 1.0
                sigma2 = b[t] if variance == "fixed_large" else b[t] * (1 - ab_prev) / (1 - ab[t])
                x = (x - b[t] / np.sqrt(1 - ab[t]) * eps) / np.sqrt(1 - b[t])
                x = x + (np.sqrt(sigma2) * z if t > 0 else 0.0)
            np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-10)


# ------------------------------------------------- (d) fori_loop == python loop

@pytest.mark.parametrize("kw", [dict(sampler="ddim", eta=0.3, parameterization="v"),
                                dict(sampler="ddpm", ddpm_variance="fixed_large",
                                     parameterization="x0", spacing="trailing")])
def test_fori_loop_matches_python_loop(kw):
    s = sch.make_schedule("cosine", 100)
    args = (toy_net, s, jax.random.PRNGKey(3), (4, 2, 3))
    a = sample(*args, num_steps=13, **kw)
    b = sample(*args, num_steps=13, use_python_loop=True, **kw)
    assert a.shape == (4, 2, 3) and a.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------- (e) traced num_steps / eta / rng

@pytest.mark.parametrize("sampler", ["ddim"])
def test_jit_traces_once(sampler):
    s = sch.make_schedule("linear", 100)
    traces = []

    @jax.jit
    def run(scale, rng, num_steps, eta):
        traces.append(1)  # Python side effect: runs only while tracing
        model = lambda x, t: scale * toy_net(x, t)
        return sample(model, s, rng, (3, 2, 3), sampler=sampler, num_steps=num_steps,
                      eta=eta, spacing="trailing")

    outs = {}
    for n in (10, 20, 50):
        for seed in (0, 1):
            outs[n, seed] = run(jnp.float32(0.9), jax.random.PRNGKey(seed), n, 0.5)
    assert len(traces) == 1
    # The traced-step-count path computes the same thing as a plain loop.
    ref = sample(lambda x, t: 0.9 * toy_net(x, t), s, jax.random.PRNGKey(1), (3, 2, 3),
                 sampler=sampler, num_steps=20, eta=0.5, spacing="trailing", use_python_loop=True)
    np.testing.assert_allclose(outs[20, 1], ref, atol=1e-5)
    assert not np.allclose(outs[10, 0], outs[50, 0])
    assert not np.allclose(outs[10, 0], outs[10, 1])


# ---------------------------------------------------------------- misc

def test_bad_static_arguments_raise():
    s = sch.make_schedule("linear", 10)
    for kw, names in ((dict(sampler="heun"), ("ddpm", "ddim", "plms", "euler")),
                      (dict(parameterization="score"), ("eps", "x0", "v")),
                      (dict(spacing="karras"), ("leading", "trailing", "linspace")),
                      (dict(sampler="ddpm", ddpm_variance="learned"), ("fixed_small",))):
        with pytest.raises(ValueError) as e:
            sample(toy_net, s, jax.random.PRNGKey(0), (1, 2, 3), num_steps=2, **kw)
        assert all(n in str(e.value) for n in names)


def test_bf16_model_output_is_cast():
    s = sch.make_schedule("linear", 50)
    out = sample(lambda x, t: toy_net(x, t).astype(jnp.bfloat16), s, jax.random.PRNGKey(0),
                 (2, 2, 3), num_steps=5)
    assert out.dtype == jnp.float32 and np.all(np.isfinite(out))
