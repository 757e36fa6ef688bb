"""The first-stage train step: autoencoder (KL or VQ) and PatchGAN discriminator, each with its
own optimiser, as latent-diffusion's LPIPSWithDiscriminator and taming's VQ loss train them.

One call does both of the reference's optimizer_idx steps on the same batch: the generator step
(reconstruction + perceptual + KL or codebook loss + adaptively weighted GAN loss), then the
discriminator step on the real images and the (now fixed) reconstructions. Before
`loss.disc_start` the GAN terms are weighted by 0 and the discriminator's parameters, batch
statistics and optimiser state are kept exactly as they were (the reference updates the
running statistics from step 0). The switch is a select, not `lax.cond`: XLA:CPU ran this
step 20x slower inside a conditional.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ldm_jax.losses import autoencoder as L
from ldm_jax.training.train_state import ema_after_step


@flax.struct.dataclass
class AutoencoderState:
    step: jax.Array
    params: Any            # {"autoencoder": ..., "logvar": scalar}
    ema_params: Any        # EMA of params, or None when training.use_ema is off
    opt_state: Any
    disc_params: Any
    disc_stats: Any        # the discriminator's non-parameter collections (BatchNorm statistics)
    disc_opt_state: Any
    model_state: Any       # the autoencoder's non-parameter collections (EMA codebook), or {}
    rng: jax.Array


def init_state(config, model, disc, tx, disc_tx, rng, image_shape) -> AutoencoderState:
    """Call under jax.jit. `image_shape` is one example's (H, W, C)."""
    from ldm_jax.models.initializers import init_from_one_draw
    ae_key, d_key, state_key = jax.random.split(rng, 3)
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = init_from_one_draw(lambda k: model.init({"params": k}, x), ae_key)
    variables = flax.core.unfreeze(variables)
    ae_params = variables.pop("params")
    params = {"autoencoder": ae_params, "logvar": jnp.full((), config.loss.logvar_init, jnp.float32)}
    # ActNorm initialises from its first batch (taming uses the first training batch); uniform
    # noise in the image range stands in here, since init sees no data. BatchNorm ignores it.
    x_d = (jax.random.uniform(jax.random.fold_in(d_key, 1), (8, *image_shape), jnp.float32,
                              -1.0, 1.0) if disc.norm == "act" else x)
    d_vars = flax.core.unfreeze(disc.init({"params": d_key}, x_d, train=True))
    d_params = d_vars.pop("params")
    return AutoencoderState(
        step=jnp.zeros((), jnp.int32), params=params,
        ema_params=jax.tree_util.tree_map(jnp.copy, params) if config.training.use_ema else None,
        opt_state=tx.init(params), disc_params=d_params, disc_stats=d_vars,
        disc_opt_state=disc_tx.init(d_params), model_state=variables, rng=state_key)


def last_layer(params):
    """The decoder's last conv kernel: where the adaptive GAN weight compares gradients."""
    return params["autoencoder"]["decoder"]["conv_out"]["kernel"]


def make_train_step(config, model, disc, tx, disc_tx, lr_fn, kind: str):
    """Returns step(state, batch, lpips_params) -> (state, metrics); `kind` is "kl" or "vq".
    lpips_params is None when loss.perceptual_weight is 0."""
    lc = config.loss
    pw = float(lc.perceptual_weight)
    # A run that ends before disc_start never weighs the GAN terms above 0, so its steps skip
    # the discriminator and the adaptive weight's two extra pullbacks (same updates, ~10% less
    # time on a CPU); a resumed run with more steps compiles the full step again.
    gan_possible = (lc.disc_weight > 0 and lc.disc_factor > 0
                    and lc.disc_start < config.training.num_steps)
    d_loss_kind = lc.disc_loss

    def lpips_fn(lpips_params, x, xrec):
        if lpips_params is None or pw == 0:
            return None
        from ldm_jax.models.lpips import LPIPS
        return LPIPS().apply({"params": lpips_params}, x, xrec)

    def forward(params, model_state, disc_vars, x, key, lpips_params, with_gan):
        """Losses as a vector (nll, g, rest) so one vjp can weigh them after the fact."""
        sample_key, dropout_key = jax.random.split(key)
        logvar = params["logvar"] if lc.learn_logvar else jax.lax.stop_gradient(params["logvar"])
        mutable = list(model_state) if model_state else False
        out = model.apply({"params": params["autoencoder"], **model_state}, x,
                          sample_key if kind == "kl" else None, train=True,
                          rngs={"dropout": dropout_key, "vq_restart": sample_key},
                          mutable=mutable)
        (xrec, extra), new_model_state = (out if mutable else (out, model_state))
        p = lpips_fn(lpips_params, x, xrec)
        aux = {}
        if kind == "kl":
            terms = L.nll_loss(x, xrec, p, logvar, pw, pixel_loss=lc.pixel_loss)
            nll = terms["nll_loss"]
            rest = lc.kl_weight * L.kl_loss(extra.kl())
            aux.update(kl_loss=L.kl_loss(extra.kl()), rec_loss=terms["rec_loss"])
        else:
            qloss, info = extra
            nll = L.vq_nll_loss(x, xrec, p, pw, lc.pixel_loss)
            q = jnp.mean(qloss)
            rest = lc.codebook_weight * q
            aux.update(quant_loss=q, rec_loss=nll, perplexity=info["perplexity"],
                       codebook_usage=info["usage"])
        aux["p_loss"] = jnp.zeros(()) if p is None else jnp.mean(p)
        if with_gan:
            stats_cols = list(disc_vars["stats"])
            logits_fake, new_stats = disc.apply({"params": disc_vars["params"],
                                                 **disc_vars["stats"]}, xrec, train=True,
                                                mutable=stats_cols)
            g = L.generator_adv_loss(logits_fake)
        else:
            g, new_stats = jnp.zeros(()), disc_vars["stats"]
        return jnp.stack([nll, g, rest]), (xrec, aux, new_model_state, new_stats)

    def generator_step(state, x, key, lpips_params, disc_factor, with_gan):
        disc_vars = {"params": state.disc_params, "stats": state.disc_stats}
        losses, vjp_fn, (xrec, aux, model_state, disc_stats) = jax.vjp(
            lambda p: forward(p, state.model_state, disc_vars, x, key, lpips_params, with_gan),
            state.params, has_aux=True)
        nll, g, rest = losses[0], losses[1], losses[2]
        if with_gan:
            # Only the decoder's last kernel is read from these two pullbacks, so XLA keeps
            # just the path from each loss to that kernel, as torch.autograd.grad does.
            g_nll = last_layer(vjp_fn(jnp.array([1.0, 0.0, 0.0]))[0])
            g_g = last_layer(vjp_fn(jnp.array([0.0, 1.0, 0.0]))[0])
            d_weight = L.adaptive_weight(jnp.linalg.norm(g_nll), jnp.linalg.norm(g_g),
                                         lc.disc_weight)
        else:
            d_weight = jnp.zeros(())
        weights = jnp.stack([jnp.ones(()), d_weight * disc_factor, jnp.ones(())])
        grads = vjp_fn(weights)[0]
        loss = jnp.dot(weights, losses)
        metrics = {"loss": loss, "nll_loss": nll, "g_loss": g, "d_weight": d_weight,
                   "logvar": state.params["logvar"], **aux}
        return grads, xrec, model_state, disc_stats, metrics

    def discriminator_step(d_params, d_stats, d_opt, x, xrec, disc_factor):
        def d_loss_fn(params):
            cols = list(d_stats)
            real, stats = disc.apply({"params": params, **d_stats}, x, train=True, mutable=cols)
            fake, stats = disc.apply({"params": params, **stats}, jax.lax.stop_gradient(xrec),
                                     train=True, mutable=cols)
            loss, logs = L.discriminator_loss(real, fake, disc_factor, d_loss_kind)
            return loss, (stats, logs)
        (_, (stats, logs)), grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d_params)
        updates, d_opt = disc_tx.update(grads, d_opt, d_params)
        return optax.apply_updates(d_params, updates), stats, d_opt, logs

    def step_with(state, batch, lpips_params, with_gan):
        key = jax.random.fold_in(state.rng, state.step)
        x = batch["image"]
        active = state.step >= lc.disc_start
        disc_factor = (L.adopt_weight(lc.disc_factor, state.step, lc.disc_start) if with_gan
                       else jnp.zeros(()))
        grads, xrec, model_state, d_stats, metrics = generator_step(
            state, x, key, lpips_params, disc_factor, with_gan)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d_params, d_opt = state.disc_params, state.disc_opt_state
        if with_gan:
            new_d = discriminator_step(d_params, d_stats, d_opt, x, xrec, disc_factor)
            keep = lambda new, old: jax.tree_util.tree_map(
                lambda a, b: jnp.where(active, a, b), new, old)
            d_params, d_stats, d_opt = keep(new_d[:3], (d_params, state.disc_stats, d_opt))
            d_logs = new_d[3]
        else:
            d_logs = {"disc_loss": jnp.zeros(()), "logits_real": jnp.zeros(()),
                      "logits_fake": jnp.zeros(())}
        ema = (None if state.ema_params is None
               else ema_after_step(state.ema_params, params, state.step, config.training))
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema,
                                  opt_state=opt_state, disc_params=d_params, disc_stats=d_stats,
                                  disc_opt_state=d_opt, model_state=model_state)
        metrics.update(d_logs, disc_factor=disc_factor, grad_norm=optax.tree.norm(grads),
                       lr=lr_fn(state.step))
        return new_state, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}

    def train_step(state, batch, lpips_params=None):
        return step_with(state, batch, lpips_params, gan_possible)

    return train_step
