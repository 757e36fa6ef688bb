"""PLMS, DPM-Solver++(2M) (+SDE), Euler and Euler-ancestral against diffusers'
PyTorch schedulers, plus accuracy on Gaussian data and traced step counts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402

from ldm_jax.diffusion import schedules as sch  # noqa: E402
from ldm_jax.diffusion.samplers import sample, sampler_timesteps  # noqa: E402

T = 1000
SHAPE = (2, 3, 4, 4)
RNG = jax.random.PRNGKey(7)
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETAS = {"sd": ("scaled_linear", 0.00085, 0.012), "ddpm": ("linear", 1e-4, 0.02)}


def net(xp, x, t):
    """A fixed nonlinear model, written once for numpy-like modules (jnp, torch)."""
    return xp.tanh(0.7 * x + 0.0013 * t - 0.3) * (1 + 0.2 * xp.cos(1.3 * x)) + 0.05 * x


def jax_model(x, t):
    return net(jnp, x, t[0].astype(jnp.float32))


def make_scheduler(sampler, betas, param, spacing, offset, **kw):
    kind, start, end = BETAS[betas]
    cfg = dict(num_train_timesteps=T, beta_schedule=kind, beta_start=start, beta_end=end,
               prediction_type=PREDICTION[param], timestep_spacing=spacing, steps_offset=offset)
    if sampler == "plms":
        return diffusers.PNDMScheduler(skip_prk_steps=True, **cfg, **kw)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        algo = "dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++"
        return diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type=algo, **cfg, **kw)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg, **kw)
    return diffusers.EulerAncestralDiscreteScheduler(**cfg, **kw)


def noises(n):
    """The sampler's documented noise streams: x_T from the first half of the
    split key, step i's noise from fold_in(second half, i)."""
    init_rng, step_rng = jax.random.split(RNG)
    x_T = np.asarray(jax.random.normal(init_rng, SHAPE, jnp.float32))
    steps = [np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), SHAPE, jnp.float32))
             for i in range(n)]
    return x_T, steps


def diffusers_loop(scheduler, n, monkeypatch, sde):
    scheduler.set_timesteps(n)
    x_T, steps = noises(len(scheduler.timesteps))
    step_noise = [torch.from_numpy(z) for z in steps]
    # Euler-ancestral draws its noise with randn_tensor: hand it ours, in order.
    queue = list(step_noise)
    monkeypatch.setattr(euler_a_module, "randn_tensor", lambda *a, **k: queue.pop(0))
    x = torch.from_numpy(x_T) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        inp = scheduler.scale_model_input(x, t)
        out = net(torch, inp, t.to(torch.float32))
        kw = dict(variance_noise=step_noise[i]) if sde else {}
        x = scheduler.step(out, t, x, **kw).prev_sample
    return scheduler.timesteps.numpy(), x.numpy()


CASES = [
    # (sampler, betas, parameterization, spacing, steps_offset, num_steps, scheduler kwargs)
    ("plms", "sd", "eps", "leading", 1, 20, {}),
    ("plms", "sd", "v", "trailing", 0, 9, dict(set_alpha_to_one=True)),
    ("plms", "ddpm", "eps", "linspace", 0, 13, {}),
    ("plms", "sd", "eps", "leading", 0, 2, {}),
    ("plms", "sd", "v", "leading", 1, 1, {}),
    ("dpmpp_2m", "sd", "eps", "leading", 1, 20, {}),
    ("dpmpp_2m", "sd", "v", "trailing", 0, 10, {}),
    ("dpmpp_2m", "ddpm", "x0", "linspace", 0, 25, {}),
    ("dpmpp_2m", "sd", "eps", "linspace", 0, 2, {}),
    ("dpmpp_2m", "sd", "x0", "leading", 1, 1, {}),
    ("dpmpp_2m_sde", "sd", "eps", "leading", 1, 15, {}),
    ("dpmpp_2m_sde", "ddpm", "v", "trailing", 0, 12, {}),
    ("euler", "sd", "eps", "leading", 1, 20, {}),
    ("euler", "sd", "v", "trailing", 0, 15, {}),
    ("euler", "ddpm", "x0", "linspace", 0, 10, {}),  # (T-1)/(n-1) integral
    ("euler", "sd", "eps", "leading", 1, 1, {}),
    ("euler_a", "sd", "eps", "leading", 1, 20, {}),
    ("euler_a", "ddpm", "v", "trailing", 0, 11, {}),
]


@pytest.mark.parametrize("sampler,betas,param,spacing,offset,n,kw", CASES)
def test_matches_diffusers(sampler, betas, param, spacing, offset, n, kw, monkeypatch):
    sde = sampler == "dpmpp_2m_sde"
    ref_ts, ref = diffusers_loop(make_scheduler(sampler, betas, param, spacing, offset, **kw),
                                 n, monkeypatch, sde)
    np.testing.assert_array_equal(sampler_timesteps(sampler, T, n, spacing, offset), ref_ts)
    kind, start, end = BETAS[betas]
    schedule = sch.make_schedule(kind, T, beta_start=start, beta_end=end)
    final = 1.0 if kw.get("set_alpha_to_one", False) else None
    got = sample(jax_model, schedule, RNG, SHAPE, sampler=sampler, num_steps=n,
                 parameterization=param, clip_denoised=False, spacing=spacing,
                 steps_offset=offset, final_alpha_cumprod=final)
    scale = max(1.0, np.abs(ref).max())
    err = np.abs(np.asarray(got, np.float64) - ref).max() / scale
    print(f"{sampler} {betas} {param} {spacing} n={n}: max|ref| {np.abs(ref).max():.2f} "
          f"max err / max(1, max|ref|) {err:.2e}")
    assert err <= 1e-5


# ----------------------------------------- Gaussian data: ODE solver accuracy

def test_dpmpp_2m_solves_the_ode_better_than_ddim():
    """Data ~ N(mu, s^2) per dimension has the exact E[eps | x_t]; in
    y = x / sqrt(ab) against sigma = sqrt((1 - ab) / ab) the probability-flow
    ODE is dy/dsigma = sigma (y - mu) / (s^2 + sigma^2), so y - mu scales
    with sqrt(s^2 + sigma^2): the ODE solution is closed-form.

    With 'trailing' spacing both samplers visit the same timesteps (999, 949,
    ..., 49), and both end with the same first-order jump from sigma_last
    (t = 49) to sigma = 0, which returns the x0 prediction E[x0 | x_t]. Two
    references: (a) the exact ODE endpoint at sigma = 0; (b) the exact ODE
    state at sigma_last followed by that same final jump, which isolates how
    well each solver integrates the ODE over its multistep part."""
    mu = jnp.asarray([-0.5, 0.0, 0.5, 1.0], jnp.float32)
    s = jnp.asarray([0.5, 1.0, 1.5, 2.0], jnp.float32)
    schedule = sch.make_schedule("scaled_linear", T)

    def oracle(x, t):
        sa = schedule.sqrt_alphas_cumprod[t][:, None]
        s1a = schedule.sqrt_one_minus_alphas_cumprod[t][:, None]
        return s1a * (x - sa * mu) / (sa ** 2 * s ** 2 + s1a ** 2)

    def sigma(t):
        return (np.float64(schedule.sqrt_one_minus_alphas_cumprod[t])
                / np.float64(schedule.sqrt_alphas_cumprod[t]))

    shape, rng, n = (256, 4), jax.random.PRNGKey(3), 20
    ts = sampler_timesteps("ddim", T, n, "trailing")
    np.testing.assert_array_equal(sampler_timesteps("dpmpp_2m", T, n, "trailing"), ts)
    x_T = jax.random.normal(jax.random.split(rng)[0], shape, jnp.float32)
    mu64, s64 = np.asarray(mu, np.float64), np.asarray(s, np.float64)
    dev_T = np.asarray(x_T, np.float64) * np.sqrt(1 + sigma(ts[0]) ** 2) - mu64  # y_T - mu
    endpoint = mu64 + dev_T * s64 / np.sqrt(s64 ** 2 + sigma(ts[0]) ** 2)
    dev_last = dev_T * np.sqrt((s64 ** 2 + sigma(ts[-1]) ** 2) / (s64 ** 2 + sigma(ts[0]) ** 2))
    same_last_jump = mu64 + dev_last * s64 ** 2 / (s64 ** 2 + sigma(ts[-1]) ** 2)
    errs = {}
    for name in ("ddim", "dpmpp_2m"):
        out = np.asarray(sample(oracle, schedule, rng, shape, sampler=name, num_steps=n, eta=0.0,
                                clip_denoised=False, spacing="trailing", final_alpha_cumprod=1.0),
                         np.float64)
        errs[name] = (np.abs(out - endpoint).max(), np.abs(out - same_last_jump).max())
    print("max error, 20 steps: (a) vs exact ODE endpoint, (b) vs exact ODE to t=49 + final jump: "
          + ", ".join(f"{k} ({a:.2e}, {b:.2e})" for k, (a, b) in errs.items()))
    assert errs["dpmpp_2m"][0] < 0.5 * errs["ddim"][0]
    assert errs["dpmpp_2m"][1] < 0.1 * errs["ddim"][1]


# ----------------------------------------------- traced step count, one trace

NEW_SAMPLERS = ["plms", "dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_a"]


@pytest.mark.parametrize("sampler", NEW_SAMPLERS)
def test_traced_num_steps_compiles_once(sampler):
    schedule = sch.make_schedule("scaled_linear", T)
    traces = []

    @jax.jit
    def run(rng, num_steps):
        traces.append(1)  # Python side effect: runs only while tracing
        return sample(jax_model, schedule, rng, (2, 3), sampler=sampler, num_steps=num_steps,
                      parameterization="v", clip_denoised=True, spacing="leading",
                      steps_offset=1)

    outs = {n: run(RNG, jnp.int32(n)) for n in (7, 12, 1)}
    assert len(traces) == 1 and run._cache_size() == 1
    for n in (7, 1):
        ref = sample(jax_model, schedule, RNG, (2, 3), sampler=sampler, num_steps=n,
                     parameterization="v", clip_denoised=True, spacing="leading",
                     steps_offset=1, use_python_loop=True)
        np.testing.assert_allclose(outs[n], ref, atol=1e-5)
    assert not np.allclose(outs[7], outs[12])


def test_clipping_bounds_the_final_sample():
    # Every sampler ends on its (clipped) x0 prediction or a step to sigma = 0.
    schedule = sch.make_schedule("linear", T)
    wild = lambda x, t: 3.0 * jnp.sin(5 * x)
    for sampler in NEW_SAMPLERS:
        out = sample(wild, schedule, RNG, (4, 5), sampler=sampler, num_steps=8,
                     parameterization="x0", clip_denoised=True, clip_range=0.5)
        assert np.all(np.abs(np.asarray(out)) <= 0.5 + 1e-6)
