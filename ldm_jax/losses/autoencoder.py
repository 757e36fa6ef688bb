"""The first-stage (autoencoder) training objective, as pure functions.

Reproduces latent-diffusion's `LPIPSWithDiscriminator` (KL autoencoders,
ldm/modules/losses/contperceptual.py) and taming's `VQLPIPSWithDiscriminator` (VQ autoencoders,
taming/modules/losses/vqperceptual.py). Images are NHWC; LPIPS is computed by the caller and
passed in as one value per image (shape (B,) or anything with B elements, e.g. (B, 1, 1, 1)),
so this file does not depend on the LPIPS network. Everything is computed in at least float32.

KL autoencoder, generator step (optimizer_idx 0 in the reference):
    rec       = |x - xrec| + perceptual_weight * lpips        per pixel and channel; lpips is
                                                              broadcast over every pixel and
                                                              channel of its image
    nll       = rec / exp(logvar) + logvar
    nll_loss  = sum(nll) / B                                  (sum over pixels, channels, images)
    kl_loss   = sum(kl) / B                                   (kl per image, already summed)
    g_loss    = -mean(D(xrec))                                (hinge and vanilla alike)
    d_weight  = disc_weight * clip(|grad_W nll_loss| / (|grad_W g_loss| + 1e-4), 0, 1e4), no grad
                with W the decoder's last conv kernel (`conv_out`, not its bias)
    loss      = weighted_nll_loss + kl_weight * kl_loss + d_weight * disc_factor * g_loss
    disc_factor = adopt_weight(disc_factor, step, disc_start)
  The learned `logvar` of the reference is in neither optimiser, so it stays 0 there.

Discriminator step (optimizer_idx 1), real and fake in separate D calls, inputs without grad:
    d_loss = disc_factor * {hinge,vanilla}_d_loss(D(x), D(xrec))

VQ autoencoder (taming), generator step:
    nll_loss = mean(|x - xrec| + perceptual_weight * lpips)    (a mean, not sum / B)
    loss     = nll_loss + d_weight * disc_factor * g_loss + codebook_weight * mean(qloss)
  with d_weight computed from this nll_loss.

A train step's use, sketched (the last conv split out so the adaptive weight only reruns it):
    h = decoder_features(params, z)                  # everything before conv_out
    def rec(kernel): return conv_out(h, kernel, bias)
    nll_fn = lambda k: nll_loss(x, rec(k), lpips(x, rec(k)), logvar, pw)["nll_loss"]
    g_fn   = lambda k: generator_adv_loss(D(rec(k)))
    d_weight = adaptive_weight_from(nll_fn, g_fn, kernel, disc_weight)
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

DISC_LOSSES = ("hinge", "vanilla")
PIXEL_LOSSES = ("l1", "l2")


def _f(x):
    if isinstance(x, (int, float)):
        return x  # Python scalars stay weakly typed: they adopt the arrays' dtype
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ------------------------------------------------------------------ adversarial terms

def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(xrec))))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f(logits_real)))
                  + jnp.mean(jax.nn.relu(1.0 + _f(logits_fake))))


def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(xrec)))): the non-saturating GAN loss."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f(logits_real)))
                  + jnp.mean(jax.nn.softplus(_f(logits_fake))))


def d_loss_fn(kind: str) -> Callable:
    """The discriminator loss called `kind` ("hinge" | "vanilla")."""
    if kind not in DISC_LOSSES:
        raise ValueError(f"unknown discriminator loss {kind!r}; expected one of {DISC_LOSSES}")
    return hinge_d_loss if kind == "hinge" else vanilla_d_loss


def generator_adv_loss(logits_fake):
    """-mean(D(xrec)). The reference uses this for hinge and vanilla discriminators alike
    (not the non-saturating softplus(-D) for vanilla)."""
    return -jnp.mean(_f(logits_fake))


def adopt_weight(weight, step, threshold, value=0.0):
    """`value` (0) while step < threshold (the reference's `disc_start`), `weight` from then on.

    Traceable: `step` may be a traced integer inside `jax.jit`."""
    return jnp.where(jnp.asarray(step) < threshold, _f(value), _f(weight))


def discriminator_loss(logits_real, logits_fake, disc_factor, kind: str = "hinge"):
    """The discriminator step: (disc_factor * d_loss, logs).

    `disc_factor` is already `adopt_weight(disc_factor, step, disc_start)`. Compute the two logit
    sets in separate discriminator calls, on inputs under `jax.lax.stop_gradient`."""
    d = d_loss_fn(kind)(logits_real, logits_fake)
    loss = _f(disc_factor) * d
    return loss, {"disc_loss": loss, "logits_real": jnp.mean(_f(logits_real)),
                  "logits_fake": jnp.mean(_f(logits_fake))}


# ------------------------------------------------------------------ reconstruction terms

def reconstruction_loss(x, xrec, lpips_per_image=None, perceptual_weight=1.0, pixel_loss="l1"):
    """Per-element rec = |x - xrec| (or (x - xrec)^2 for "l2") + perceptual_weight * lpips.

    lpips has one value per image and is broadcast over every pixel and channel of it, so in a
    sum over elements it counts H*W*C times. Pass None (or perceptual_weight=0) for no LPIPS.
    Returns an array of x's shape.
    """
    if pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"unknown pixel loss {pixel_loss!r}; expected one of {PIXEL_LOSSES}")
    x, xrec = _f(x), _f(xrec)
    if x.shape != xrec.shape:
        raise ValueError(f"reconstruction shape {xrec.shape} differs from input shape {x.shape}")
    diff = x - xrec
    rec = jnp.abs(diff) if pixel_loss == "l1" else jnp.square(diff)
    skip = isinstance(perceptual_weight, (int, float)) and perceptual_weight == 0
    if lpips_per_image is not None and not skip:
        p = _f(lpips_per_image)
        if p.size != x.shape[0]:
            raise ValueError(f"LPIPS must have one value per image: got shape {p.shape} "
                             f"for a batch of {x.shape[0]}")
        rec = rec + perceptual_weight * p.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return rec


def nll_loss(x, xrec, lpips_per_image=None, logvar=0.0, perceptual_weight=1.0, weights=None,
             pixel_loss="l1"):
    """latent-diffusion's NLL under a Laplace-like likelihood with one learned log-variance.

        rec = |x - xrec| + perceptual_weight * lpips           (see reconstruction_loss;
                                                                (x - xrec)^2 with "l2")
        nll = rec / exp(logvar) + logvar
        nll_loss = sum(nll) / B;  weighted_nll_loss = sum(weights * nll) / B  (weights=None: 1)

    Returns a dict: nll_loss, weighted_nll_loss (the one in the total loss; equal to nll_loss
    unless `weights` is given), rec_loss (mean of rec, perceptual part included, as the
    reference logs it). The adaptive weight uses nll_loss, not weighted_nll_loss.
    """
    rec = reconstruction_loss(x, xrec, lpips_per_image, perceptual_weight, pixel_loss)
    logvar = _f(logvar)
    nll = rec / jnp.exp(logvar) + logvar
    b = rec.shape[0]
    weighted = nll if weights is None else _f(weights) * nll
    return {"nll_loss": jnp.sum(nll) / b, "weighted_nll_loss": jnp.sum(weighted) / b,
            "rec_loss": jnp.mean(rec)}


def kl_loss(posterior_kl):
    """sum(kl) / B for a per-image KL of shape (B,) (the diagonal Gaussian's KL to N(0, I),
    already summed over the latent's elements)."""
    kl = _f(posterior_kl)
    return jnp.sum(kl) / kl.shape[0]


# ------------------------------------------------------------------ adaptive weight

def adaptive_weight(nll_grad_norm, g_grad_norm, disc_weight, eps=1e-4, max_weight=1e4):
    """disc_weight * clip(nll_grad_norm / (g_grad_norm + eps), 0, max_weight), gradient stopped.

    Balances the GAN term against the reconstruction at the decoder's last layer
    (Esser et al. 2021, eq. 7)."""
    d = _f(nll_grad_norm) / (_f(g_grad_norm) + eps)
    d = jax.lax.stop_gradient(jnp.clip(d, 0.0, max_weight))
    return d * disc_weight


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(_f(g))) for g in jax.tree_util.tree_leaves(tree)))


def adaptive_weight_from(nll_fn, g_fn, last_layer_params, disc_weight, eps=1e-4, max_weight=1e4):
    """`adaptive_weight` from the gradients of two scalar losses w.r.t. the last layer.

    nll_fn(last_layer_params) and g_fn(last_layer_params) must compute nll_loss and g_loss with
    `last_layer_params` substituted into the decoder. The reference differentiates w.r.t.
    `decoder.conv_out.weight` only: pass the kernel alone (not the bias) to match it. A pytree is
    accepted; its norm is the global L2 norm over leaves. Frobenius norms do not depend on the
    kernel's layout, so flax's (kh, kw, in, out) gives PyTorch's numbers.
    """
    nll_g = jax.grad(nll_fn)(last_layer_params)
    g_g = jax.grad(g_fn)(last_layer_params)
    return adaptive_weight(_global_norm(nll_g), _global_norm(g_g), disc_weight, eps, max_weight)


# ------------------------------------------------------------------ whole generator losses

def kl_generator_loss(nll_terms, kl, g_loss, d_weight, disc_factor, kl_weight, logvar=0.0):
    """latent-diffusion's generator total: weighted_nll + kl_weight * kl + d_weight * disc_factor * g.

    nll_terms: the dict of `nll_loss`; kl: `kl_loss(...)`; g_loss: `generator_adv_loss(...)`;
    d_weight: `adaptive_weight_from(...)` (0 where the config's disc_factor is 0, as the
    reference does); disc_factor: `adopt_weight(disc_factor, step, disc_start)`.
    Returns (loss, logs).
    """
    loss = (nll_terms["weighted_nll_loss"] + kl_weight * _f(kl)
            + _f(d_weight) * _f(disc_factor) * _f(g_loss))
    logs = {"total_loss": loss, "logvar": logvar, "kl_loss": kl,
            "nll_loss": nll_terms["nll_loss"], "rec_loss": nll_terms["rec_loss"],
            "d_weight": d_weight, "disc_factor": disc_factor, "g_loss": g_loss}
    return loss, {k: jnp.asarray(_f(v)) for k, v in logs.items()}


def vq_nll_loss(x, xrec, lpips_per_image=None, perceptual_weight=1.0, pixel_loss="l1"):
    """taming's VQ reconstruction term: mean(rec) over all elements and images (a mean, unlike
    the KL loss's sum / B). pixel_loss="l2" is latent-diffusion's VQ variant."""
    return jnp.mean(reconstruction_loss(x, xrec, lpips_per_image, perceptual_weight, pixel_loss))


def vq_loss_terms(x, xrec, lpips_per_image, codebook_loss, logits_fake, d_weight, disc_factor,
                  perceptual_weight=1.0, codebook_weight=1.0, pixel_loss="l1"):
    """taming's `VQLPIPSWithDiscriminator` generator step. Returns (loss, logs):

        loss = mean(|x - xrec| + pw * lpips) + d_weight * disc_factor * (-mean(D(xrec)))
               + codebook_weight * mean(codebook_loss)

    d_weight comes from `adaptive_weight_from` with nll_fn built on `vq_nll_loss`.
    """
    rec = reconstruction_loss(x, xrec, lpips_per_image, perceptual_weight, pixel_loss)
    nll = jnp.mean(rec)
    g_loss = generator_adv_loss(logits_fake)
    q = jnp.mean(_f(codebook_loss))
    loss = nll + _f(d_weight) * _f(disc_factor) * g_loss + codebook_weight * q
    p = jnp.zeros(()) if lpips_per_image is None else jnp.mean(_f(lpips_per_image))
    logs = {"total_loss": loss, "quant_loss": q, "nll_loss": nll, "rec_loss": nll,
            "p_loss": p, "d_weight": d_weight, "disc_factor": disc_factor, "g_loss": g_loss}
    return loss, {k: jnp.asarray(_f(v)) for k, v in logs.items()}
