"""img2img (init + strength) and blended inpainting for every sampler, against
emulations of diffusers' StableDiffusionImg2ImgPipeline and 4-channel
StableDiffusionInpaintPipeline loops on diffusers' PyTorch schedulers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm as ddpm_module  # noqa: E402
from diffusers.schedulers import scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402

from ldm_jax.diffusion import schedules as sch  # noqa: E402
from ldm_jax.diffusion.img2img import run_length  # noqa: E402
from ldm_jax.diffusion.samplers import SAMPLERS, sample  # noqa: E402

T = 1000
SHAPE = (2, 4, 4, 3)
RNG = jax.random.PRNGKey(11)
N = 10
PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
BETAS = {"sd": ("scaled_linear", 0.00085, 0.012), "ddpm": ("linear", 1e-4, 0.02)}
# Per sampler: (betas, parameterization, spacing, steps_offset, eta).
CONFIGS = {
    "ddpm": ("sd", "eps", "leading", 1, 0.0),
    "ddim": ("sd", "v", "leading", 1, 0.5),
    "plms": ("sd", "eps", "leading", 1, 0.0),
    "dpmpp_2m": ("sd", "eps", "leading", 1, 0.0),
    "dpmpp_2m_sde": ("ddpm", "v", "trailing", 0, 0.0),
    "euler": ("sd", "eps", "leading", 1, 0.0),
    "euler_a": ("sd", "v", "trailing", 0, 0.0),
}


def net(xp, x, t):
    """A fixed nonlinear model, written once for numpy-like modules (jnp, torch).
    Each pixel also sees its neighbour (roll along H), so what inpainting
    blends into the kept region reaches the generated one."""
    x = x + 0.5 * xp.roll(x, 1, 1)
    return xp.tanh(0.7 * x + 0.0013 * t - 0.3) * (1 + 0.2 * xp.cos(1.3 * x)) + 0.05 * x


def jax_model(x, t):
    return net(jnp, x, t[0].astype(jnp.float32))


def make_init():
    return jnp.asarray(np.random.default_rng(0).uniform(-1, 1, SHAPE), jnp.float32)


def make_mask():
    mask = (np.random.default_rng(1).uniform(size=SHAPE[:-1] + (1,)) > 0.5).astype(np.float32)
    assert 0 < mask.sum() < mask.size
    return jnp.asarray(mask)


def ours(sampler, init, strength, mask=None, **kw):
    betas, param, spacing, offset, eta = CONFIGS[sampler]
    kind, start, end = BETAS[betas]
    schedule = sch.make_schedule(kind, T, beta_start=start, beta_end=end)
    return sample(jax_model, schedule, RNG, SHAPE, sampler=sampler, num_steps=N, eta=eta,
                  parameterization=param, clip_denoised=False, spacing=spacing,
                  steps_offset=offset, final_alpha_cumprod=None if sampler == "plms" else 1.0,
                  init=init, strength=strength, inpaint_mask=mask, **kw)


def make_scheduler(sampler):
    betas, param, spacing, offset, _ = CONFIGS[sampler]
    kind, start, end = BETAS[betas]
    cfg = dict(num_train_timesteps=T, beta_schedule=kind, beta_start=start, beta_end=end,
               prediction_type=PREDICTION[param], timestep_spacing=spacing, steps_offset=offset)
    if sampler == "ddpm":
        return diffusers.DDPMScheduler(clip_sample=False, **cfg)
    if sampler == "ddim":
        return diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **cfg)
    if sampler == "plms":
        return diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, **cfg)
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde"):
        algo = "dpmsolver++" if sampler == "dpmpp_2m" else "sde-dpmsolver++"
        return diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type=algo, **cfg)
    if sampler == "euler":
        return diffusers.EulerDiscreteScheduler(**cfg)
    return diffusers.EulerAncestralDiscreteScheduler(**cfg)


def noises(n):
    """The sampler's documented noise streams: x_T (also the img2img noise)
    from the first half of the split key, the noise of the i-th step run
    from fold_in(second half, i)."""
    init_rng, step_rng = jax.random.split(RNG)
    x_T = np.asarray(jax.random.normal(init_rng, SHAPE, jnp.float32))
    steps = [np.asarray(jax.random.normal(jax.random.fold_in(step_rng, i), SHAPE, jnp.float32))
             for i in range(n)]
    return torch.from_numpy(x_T), [torch.from_numpy(z) for z in steps]


def diffusers_loop(sampler, init, strength, monkeypatch, mask=None):
    """diffusers' img2img loop, or with `mask` its 4-channel inpaint loop."""
    scheduler = make_scheduler(sampler)
    eta = CONFIGS[sampler][4]
    scheduler.set_timesteps(N)
    # StableDiffusionImg2ImgPipeline.get_timesteps (the inpaint pipeline's is the same).
    init_timestep = min(int(N * strength), N)
    t_start = max(N - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    x0 = torch.from_numpy(np.array(init))
    noise, step_noise = noises(len(timesteps))
    current = [0]
    for module in (ddpm_module, euler_a_module):  # their steps draw with randn_tensor
        monkeypatch.setattr(module, "randn_tensor", lambda *a, **k: step_noise[current[0]])
    if mask is not None and strength == 1.0:
        x = noise * scheduler.init_noise_sigma  # the inpaint pipeline's is_strength_max start
    else:
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(SHAPE[0]))
    m = None if mask is None else torch.from_numpy(np.array(mask))
    for i, t in enumerate(timesteps):
        current[0] = i
        out = net(torch, scheduler.scale_model_input(x, t), torch.as_tensor(t).to(torch.float32))
        kw = {}
        if sampler == "ddim":
            kw = dict(eta=eta, variance_noise=step_noise[i])
        elif sampler == "dpmpp_2m_sde":
            kw = dict(variance_noise=step_noise[i])
        x = scheduler.step(out, t, x, **kw).prev_sample
        if m is not None:
            proper = x0
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(x0, noise, torch.tensor([timesteps[i + 1]]))
            x = (1 - m) * proper + m * x
    return x.numpy()


def rel_err(got, ref):
    return np.abs(np.asarray(got, np.float64) - ref).max() / max(1.0, np.abs(ref).max())


# ------------------------------------------------------------------ strength 0

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_strength_zero_returns_init(sampler):
    init = make_init()
    # A traced 0 (and 0 with a mask): see the next tests.
    np.testing.assert_array_equal(ours(sampler, init, 0.0), init)


# ----------------------------------------------------- img2img against diffusers

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_matches_diffusers(sampler, monkeypatch):
    init = make_init()
    # One compile per sampler: strength is traced. float32 gives the same step
    # counts as diffusers' float64 for these strengths (checked below).
    run = jax.jit(lambda s: ours(sampler, init, s))
    # 0.1 and 0.9 give PLMS its edge cases: one step (ending on the re-step)
    # and a start on the repeated timestep.
    for strength in (0.1, 0.3, 0.75, 0.9, 1.0):
        assert int(run_length(N, jnp.float32(strength), T)) == min(int(N * strength), N)
        got = run(jnp.float32(strength))
        ref = diffusers_loop(sampler, init, strength, monkeypatch)
        err = rel_err(got, ref)
        print(f"{sampler} strength {strength}: err {err:.2e}")
        assert err <= 1e-5
    np.testing.assert_array_equal(run(jnp.float32(0.0)), init)


def test_run_length_matches_diffusers_float64():
    # A Python strength reproduces diffusers' int(n * s) in float64, including
    # products that float64 rounds just below an integer (100 * 0.29 = 28.999...).
    for s in (0.0, 0.1, 0.29, 0.3, 0.7, 0.75, 0.8, 0.99, 1.0):
        for n in (1, 3, 7, 10, 50, 100, 999):
            assert int(run_length(n, s, T)) == min(int(n * s), n), (n, s)
    assert int(run_length(100, 0.29, T)) == 28
    # Traced: same formula in the strength's dtype, clipped to [0, n].
    assert int(run_length(jnp.int32(20), jnp.float32(0.5), T)) == 10
    assert int(run_length(20, jnp.float32(1.7), T)) == 20
    # A traced float64 strength rounds as diffusers does; float32 may not.
    assert int(run_length(100, jnp.float32(0.29), T)) == 29
    with jax.enable_x64(True):
        assert int(run_length(100, jnp.float64(0.29), T)) == 28


# ------------------------------------------------------------------ inpainting

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpaint_keeps_init_and_matches_diffusers(sampler, monkeypatch):
    init, mask = make_init(), make_mask()
    keep = np.broadcast_to(np.asarray(mask) == 0, SHAPE)
    run = jax.jit(lambda s, m: ours(sampler, init, s, m))  # one compile for all calls below
    got = {}
    for strength in (0.6, 1.0):
        got[strength] = np.asarray(run(jnp.float32(strength), mask))
        np.testing.assert_array_equal(got[strength][keep], np.asarray(init)[keep])
        assert np.abs(got[strength][~keep] - np.asarray(init)[~keep]).max() > 1e-2
        ref = diffusers_loop(sampler, init, strength, monkeypatch, mask=mask)
        err = rel_err(got[strength], ref)
        print(f"{sampler} inpaint strength {strength}: err {err:.2e}")
        assert err <= 1e-5
    # Blending also changes the generated region (the model mixes neighbouring
    # pixels): an all-ones mask, which blends nothing in, gives another result there.
    free = np.asarray(run(jnp.float32(0.6), jnp.ones_like(mask)))
    assert np.abs(free[~keep] - got[0.6][~keep]).max() > 1e-4


# ------------------------------------------------------ compile once, debug loop

@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m_sde", "euler_a"])
def test_strength_change_does_not_recompile(sampler):
    init, mask = make_init(), make_mask()
    traces = []

    @jax.jit
    def run(strength, init, mask):
        traces.append(1)  # Python side effect: runs only while tracing
        return ours(sampler, init, strength, mask)

    outs = {s: run(jnp.float32(s), init, mask) for s in (0.3, 0.75, 0.0)}
    assert len(traces) == 1 and run._cache_size() == 1
    np.testing.assert_array_equal(outs[0.0], init)
    # The Python-loop debug path (with a Python strength) agrees.
    ref = ours(sampler, init, 0.75, mask, use_python_loop=True)
    np.testing.assert_allclose(outs[0.75], ref, atol=1e-5)
    assert np.abs(np.asarray(outs[0.3]) - np.asarray(outs[0.75])).max() > 1e-3


def test_bad_arguments_raise():
    init, mask = make_init(), make_mask()
    with pytest.raises(ValueError, match="strength"):
        ours("ddim", init, 1.5)
    with pytest.raises(ValueError, match="needs init"):
        ours("ddim", None, 1.0, mask)
    with pytest.raises(ValueError, match="needs init"):
        ours("euler", None, 0.5)
    with pytest.raises(ValueError, match="init has shape"):
        ours("plms", init[:1], 0.5)
    with pytest.raises(ValueError, match="inpaint_mask has shape"):
        ours("dpmpp_2m", init, 0.5, mask[..., 0])
    with pytest.raises(ValueError, match="inpaint_mask has shape"):
        ours("euler", init, 0.5, jnp.ones(SHAPE[:-1] + (2,)))
