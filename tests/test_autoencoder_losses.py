"""First-stage losses against float64 numpy hand computations of the reference formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.losses import autoencoder as L


@pytest.fixture(autouse=True, scope="module")
def x64():
    with jax.enable_x64(True):
        yield


def rand(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape)


def softplus(x):
    return np.logaddexp(0.0, x)


# ------------------------------------------------------------------ adversarial terms

def test_hinge_and_vanilla_d_losses():
    real = np.array([[2.0, 0.5], [-0.3, 1.0]])   # some beyond the margin, some inside
    fake = np.array([[-2.0, -0.2], [0.7, -1.5]])
    want_hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    assert float(L.hinge_d_loss(real, fake)) == pytest.approx(want_hinge, rel=1e-12)
    # by hand: relu(1-real) = [0, .5, 1.3, 0] -> .45; relu(1+fake) = [0, .8, 1.7, 0] -> .625
    assert want_hinge == pytest.approx(0.5 * (0.45 + 0.625))
    want_vanilla = 0.5 * (np.mean(softplus(-real)) + np.mean(softplus(fake)))
    assert float(L.vanilla_d_loss(real, fake)) == pytest.approx(want_vanilla, rel=1e-12)
    assert L.d_loss_fn("hinge") is L.hinge_d_loss and L.d_loss_fn("vanilla") is L.vanilla_d_loss
    with pytest.raises(ValueError, match="hinge"):
        L.d_loss_fn("wgan")
    # Real and fake may have different patch counts per call.
    r, f = rand(0, (4, 6, 6, 1)), rand(1, (2, 6, 6, 1))
    assert float(L.hinge_d_loss(r, f)) == pytest.approx(
        0.5 * (np.maximum(0, 1 - r).mean() + np.maximum(0, 1 + f).mean()), rel=1e-12)


def test_generator_adv_loss_is_minus_mean_for_both_kinds():
    f = rand(2, (3, 6, 6, 1))
    assert float(L.generator_adv_loss(f)) == pytest.approx(-f.mean(), rel=1e-12)


def test_discriminator_loss_scales_by_disc_factor():
    r, f = rand(3, (2, 6, 6, 1)), rand(4, (2, 6, 6, 1))
    loss, logs = L.discriminator_loss(r, f, 0.5, "vanilla")
    want = 0.5 * 0.5 * (softplus(-r).mean() + softplus(f).mean())
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(logs["logits_real"]) == pytest.approx(r.mean())
    assert float(L.discriminator_loss(r, f, 0.0)[0]) == 0.0


def test_adopt_weight_switches_at_threshold_and_traces():
    assert float(L.adopt_weight(0.8, 49, 50)) == 0.0
    assert float(L.adopt_weight(0.8, 50, 50)) == pytest.approx(0.8)
    assert float(L.adopt_weight(0.8, 51, 50)) == pytest.approx(0.8)
    assert float(L.adopt_weight(0.8, 3, 50, value=0.25)) == 0.25
    f = jax.jit(lambda s: L.adopt_weight(1.0, s, 50001))
    got = [float(f(jnp.int32(s))) for s in (0, 50000, 50001, 10 ** 6)]
    assert got == [0.0, 0.0, 1.0, 1.0]


# ------------------------------------------------------------------ reconstruction terms

def test_nll_broadcasts_lpips_per_image_and_sums_over_batch():
    b, h, w, c = 3, 4, 5, 2
    x, xrec = rand(5, (b, h, w, c)), rand(6, (b, h, w, c))
    p = np.abs(rand(7, (b,)))
    logvar, pw = 0.7, 0.5
    out = L.nll_loss(x, xrec, p, logvar, pw)
    rec = np.abs(x - xrec) + pw * p[:, None, None, None]
    nll = rec / np.exp(logvar) + logvar
    assert float(out["nll_loss"]) == pytest.approx(nll.sum() / b, rel=1e-12)
    assert float(out["weighted_nll_loss"]) == pytest.approx(nll.sum() / b, rel=1e-12)
    assert float(out["rec_loss"]) == pytest.approx(rec.mean(), rel=1e-12)
    # The same in closed form: LPIPS counts H*W*C times per image, logvar once per element.
    n = h * w * c
    closed = (np.abs(x - xrec).sum() / b + pw * n * p.mean()) / np.exp(logvar) + n * logvar
    assert float(out["nll_loss"]) == pytest.approx(closed, rel=1e-12)
    # (B, 1, 1, 1)-shaped LPIPS (the torch layout) gives the same numbers.
    out4 = L.nll_loss(x, xrec, p.reshape(b, 1, 1, 1), logvar, pw)
    assert float(out4["nll_loss"]) == pytest.approx(float(out["nll_loss"]), rel=1e-14)
    # Weights enter only the weighted variant.
    wts = np.abs(rand(8, (b, h, w, c)))
    outw = L.nll_loss(x, xrec, p, logvar, pw, weights=wts)
    assert float(outw["weighted_nll_loss"]) == pytest.approx((wts * nll).sum() / b, rel=1e-12)
    assert float(outw["nll_loss"]) == pytest.approx(nll.sum() / b, rel=1e-12)
    # No LPIPS: plain L1.
    assert float(L.nll_loss(x, xrec)["nll_loss"]) == pytest.approx(np.abs(x - xrec).sum() / b)
    with pytest.raises(ValueError, match="one value per image"):
        L.nll_loss(x, xrec, np.ones((b, 2)), logvar, pw)


def test_kl_loss_is_sum_over_batch_divided_by_batch():
    kl = np.array([10.0, 30.0, 2.0, 6.0])
    assert float(L.kl_loss(kl)) == pytest.approx(12.0)


def test_kl_generator_total():
    nll = {"nll_loss": jnp.float64(5.0), "weighted_nll_loss": jnp.float64(4.0),
           "rec_loss": jnp.float64(0.1)}
    loss, logs = L.kl_generator_loss(nll, 1e3, -0.2, d_weight=0.3, disc_factor=1.0,
                                     kl_weight=1e-6)
    assert float(loss) == pytest.approx(4.0 + 1e-3 - 0.06, rel=1e-12)
    assert float(logs["nll_loss"]) == 5.0 and float(logs["g_loss"]) == pytest.approx(-0.2)


# ------------------------------------------------------------------ adaptive weight

def test_adaptive_weight_hits_the_clamp():
    # A vanishing generator gradient: 3 / 1e-4 = 3e4 is clamped to 1e4, then * disc_weight.
    assert float(L.adaptive_weight(3.0, 0.0, 0.5)) == pytest.approx(0.5e4)
    # Inside the range.
    assert float(L.adaptive_weight(3.0, 2.0, 0.5)) == pytest.approx(0.5 * 3.0 / (2.0 + 1e-4))
    # Via gradients: g_fn constant in the kernel has zero gradient.
    k = rand(9, (3, 3, 2, 4))
    w = L.adaptive_weight_from(lambda q: jnp.sum(q ** 2), lambda q: jnp.float64(1.0), k, 0.5)
    assert float(w) == pytest.approx(0.5e4)


def test_adaptive_weight_from_gradients_of_the_last_kernel():
    k = rand(10, (3, 3, 2, 4))
    a, bm = rand(11, k.shape), rand(12, k.shape)
    nll_fn = lambda q: jnp.sum((a * q) ** 2)          # grad 2 a^2 k
    g_fn = lambda q: -jnp.mean(jnp.sin(bm * q))         # grad -cos(b k) b / n
    nll_norm = np.linalg.norm(2 * a ** 2 * k)
    g_norm = np.linalg.norm(-np.cos(bm * k) * bm / k.size)
    want = 0.5 * np.clip(nll_norm / (g_norm + 1e-4), 0, 1e4)
    assert 1e-2 < want / 0.5 < 1e4  # a case away from the clamp
    got = L.adaptive_weight_from(nll_fn, g_fn, k, 0.5)
    assert float(got) == pytest.approx(want, rel=1e-10)
    # The weight carries no gradient (the reference detaches it).
    grad = jax.grad(lambda s: L.adaptive_weight_from(lambda q: s * nll_fn(q), g_fn, k, 0.5))(2.0)
    assert float(grad) == 0.0
    # Layout-free: the torch (out, in, kh, kw) kernel gives the same norms.
    kt = k.transpose(3, 2, 0, 1)
    got_t = L.adaptive_weight_from(lambda q: nll_fn(q.transpose(2, 3, 1, 0)),
                                   lambda q: g_fn(q.transpose(2, 3, 1, 0)), kt, 0.5)
    assert float(got_t) == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------ VQ (taming)

def test_vq_loss_terms_use_means():
    b, h, w, c = 2, 3, 4, 3
    x, xrec = rand(13, (b, h, w, c)), rand(14, (b, h, w, c))
    p = np.abs(rand(15, (b,)))
    qloss = np.array(0.3)
    logits = rand(16, (b, 2, 2, 1))
    loss, logs = L.vq_loss_terms(x, xrec, p, qloss, logits, d_weight=0.8, disc_factor=1.0,
                                 perceptual_weight=1.0, codebook_weight=2.0)
    rec = np.abs(x - xrec) + p[:, None, None, None]
    want = rec.mean() + 0.8 * 1.0 * (-logits.mean()) + 2.0 * 0.3
    assert float(loss) == pytest.approx(want, rel=1e-12)
    assert float(logs["nll_loss"]) == pytest.approx(rec.mean(), rel=1e-12)
    assert float(L.vq_nll_loss(x, xrec, p)) == pytest.approx(rec.mean(), rel=1e-12)
    # Not the KL loss's sum / B.
    assert float(L.vq_nll_loss(x, xrec, p)) != pytest.approx(rec.sum() / b)
    # disc_factor 0 (before disc_start) removes the GAN term.
    loss0, _ = L.vq_loss_terms(x, xrec, p, qloss, logits, 0.8, 0.0, codebook_weight=2.0)
    assert float(loss0) == pytest.approx(rec.mean() + 0.6, rel=1e-12)
    # latent-diffusion's l2 pixel variant.
    l2 = L.vq_nll_loss(x, xrec, None, pixel_loss="l2")
    assert float(l2) == pytest.approx(np.mean((x - xrec) ** 2), rel=1e-12)


def test_bf16_inputs_compute_in_float32():
    x = jnp.ones((2, 4, 4, 3), jnp.bfloat16)
    out = L.nll_loss(x, x * 0.5, jnp.ones((2,), jnp.bfloat16))
    assert out["nll_loss"].dtype == jnp.float32


def test_nll_with_l2_pixels_sums_squares():
    """loss.pixel_loss="l2" for KL autoencoders: squared errors in the same NLL."""
    x = jnp.zeros((2, 3, 3, 3))
    xrec = jnp.full((2, 3, 3, 3), 0.5).at[0, 0, 0, 0].set(2.0)
    l1 = L.nll_loss(x, xrec, logvar=0.0)["nll_loss"]
    l2 = L.nll_loss(x, xrec, logvar=0.0, pixel_loss="l2")["nll_loss"]
    np.testing.assert_allclose(l1, (53 * 0.5 + 2.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(l2, (53 * 0.25 + 4.0) / 2, rtol=1e-6)
