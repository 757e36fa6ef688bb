"""The latent-diffusion stage's networks, state init and train step.

The model is the U-Net of `models/unet.py` configured for latents, plus, for text
conditioning, a transformer text encoder trained jointly with it. Params are
{"unet": ..., "text_encoder": ...}; the first stage is frozen and passed to every step.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from ldm_jax.diffusion import objectives
from ldm_jax.models import concat_inputs
from ldm_jax.models.initializers import init_from_one_draw
from ldm_jax.models.label_embedding import DROPPED
from ldm_jax.models.unet import UNet
from ldm_jax.parallel import BATCH_AXES
from ldm_jax.training.ddpm_stage import build_schedule, label_sizes
from ldm_jax.training.train_state import TrainState, ema_after_step

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LatentModel:
    """The U-Net and, with text conditioning, its text encoder; `cond` is a dict with any of
    labels (B, K), ids / mask (B, L) caption tokens, concat (B, h, w, C) extra channels."""
    unet: UNet
    text_encoder: Any = None
    class_embedder: Any = None  # labels as cross-attention tokens (LDM's ClassEmbedder)
    text_output: str = "last"   # last | penultimate hidden states (SD v2's, or clip_skip)
    # False: padding is attended to, by the text encoder and by cross-attention, as Stable
    # Diffusion's CLIP conditioning is (its U-Net learned to read the padded positions too).
    text_mask: bool = True

    def encode_text(self, params, ids, mask):
        return self.text_encoder.apply({"params": params["text_encoder"]}, ids,
                                       mask if self.text_mask else None,
                                       output=self.text_output)

    def apply(self, params, x_t, t, cond, train=False, rngs=None, context=None):
        """The U-Net's output; `context` (already encoded text) skips encoding cond's ids."""
        if self.text_encoder is not None and context is None:
            context = self.encode_text(params, cond["ids"], cond["mask"])
        labels, mask = cond.get("labels"), cond.get("mask") if self.text_mask else None
        if self.class_embedder is not None:
            context = self.class_embedder.apply({"params": params["class_embedder"]}, labels)
            labels = mask = None  # every label token is attended to
        x = x_t if cond.get("concat") is None else jnp.concatenate(
            [x_t, cond["concat"].astype(x_t.dtype)], axis=-1)
        return self.unet.apply({"params": params["unet"]}, x, t, labels=labels,
                               context=context,
                               context_mask=mask if context is not None else None,
                               train=train, rngs=rngs)


def build_model(config, vocab_size: int | None, latent_channels: int, factor: int,
                compute_dtype: str | None = None, text_encoder=None) -> LatentModel:
    """The latent model; `text_encoder` (a pretrained, frozen one) replaces the jointly
    trained encoder the config describes."""
    m, c = config.model, config.conditioning
    dtype = _DTYPES[compute_dtype or config.training.compute_dtype]
    text = text_encoder
    if c.text and text is None:
        from ldm_jax.models.text_encoder import TextTransformer
        te = config.text_encoder
        text = TextTransformer(vocab_size=vocab_size, max_length=te.max_length, width=te.width,
                               depth=te.depth, heads=te.heads, causal=te.causal, dtype=dtype)
    extra = concat_inputs.extra_channels(c.concat, latent_channels, factor)
    labels = label_sizes(config)
    classes = None
    context_dim = config.text_encoder.width if c.text else None
    if c.class_context and labels:
        from ldm_jax.models.label_embedding import LabelTokens
        classes = LabelTokens(labels, c.class_embed_dim, dtype=dtype)
        labels, context_dim = (), c.class_embed_dim
    unet = UNet(base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attention_levels=tuple(m.attention_levels),
                num_heads=m.num_heads, head_dim=m.head_dim or None, dropout=m.dropout,
                norm_groups=m.norm_groups, norm_eps=1e-5, downsample_padding=1,
                in_channels=latent_channels + extra, out_channels=latent_channels,
                freq_shift=0.0, flip_sin_to_cos=True,
                context_dim=context_dim, transformer_depth=m.transformer_depth,
                use_linear_projection=m.use_linear_projection, remat=m.remat,
                attention=m.attention, label_sizes=labels, dtype=dtype)
    te = config.text_encoder
    return LatentModel(unet=unet, text_encoder=text, class_embedder=classes,
                       text_output=te.output, text_mask=te.use_mask)


def build_parts(config, first, tok, text_encoder=None):
    """(model, schedule) for a run whose first stage and tokenizer (and pretrained text
    encoder, if any) are known."""
    from ldm_jax.config_checks import ConfigError
    from ldm_jax.models.unet import check_input_size
    size = config.data.image_size // first.factor
    try:
        check_input_size(size, config.model.channel_mult, ())
    except ValueError as e:
        raise ConfigError(f"latents of {size}x{size} (image {config.data.image_size}, first "
                          f"stage f={first.factor}): {e}") from None
    if config.conditioning.concat == "lowres" and first.factor % concat_inputs.LOWRES_FACTOR:
        f4 = concat_inputs.LOWRES_FACTOR
        raise ConfigError(f"conditioning.concat=lowres stacks the {f4}x smaller image onto "
                          f"the latents, which needs a first stage with f a multiple of {f4}; "
                          f"this one has f={first.factor}")
    model = build_model(config, tok.vocab_size if tok else None, first.channels, first.factor,
                        text_encoder=text_encoder)
    return model, build_schedule(config)


def empty_tokens(tok):
    """(ids, mask) of the empty caption: what dropped captions and unguided halves read."""
    if tok is None:
        return None
    ids, mask = tok.encode([""])
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def example_cond(config, model: LatentModel, latent_shape: tuple) -> dict:
    """Zero conditioning inputs of the right shapes (for init and shape checks)."""
    b, h, w, ch = latent_shape
    cond = {}
    sizes = (model.class_embedder.sizes if model.class_embedder is not None
             else model.unet.label_sizes)
    if sizes:
        cond["labels"] = jnp.zeros((b, len(sizes)), jnp.int32)
    if model.text_encoder is not None:
        L = config.text_encoder.max_length
        cond["ids"] = jnp.zeros((b, L), jnp.int32)
        cond["mask"] = jnp.ones((b, L), bool)
    extra = model.unet.in_channels - ch
    if extra:
        cond["concat"] = jnp.zeros((b, h, w, extra), jnp.float32)
    return cond


def init_state(config, model: LatentModel, tx, rng, latent_shape: tuple,
               frozen_text: bool = False) -> TrainState:
    """Params and optimiser state; call under jax.jit. With `frozen_text` the text encoder's
    params are not part of the state (they come with the frozen inputs of every step)."""
    init_rng, state_rng = jax.random.split(rng)
    shape = (1, *latent_shape[1:])
    cond = example_cond(config, model, shape)
    params = {}
    if model.text_encoder is not None and not frozen_text:
        params["text_encoder"] = init_from_one_draw(
            lambda k: model.text_encoder.init({"params": k}, cond["ids"], cond["mask"]),
            jax.random.fold_in(init_rng, 1))["params"]
    context = None
    if model.text_encoder is not None:
        context = jnp.zeros((1, config.text_encoder.max_length, config.text_encoder.width))
    labels = cond.get("labels")
    if model.class_embedder is not None:
        params["class_embedder"] = init_from_one_draw(
            lambda k: model.class_embedder.init({"params": k}, labels),
            jax.random.fold_in(init_rng, 2))["params"]
        context = model.class_embedder.apply({"params": params["class_embedder"]}, labels)
        labels = None
    x = jnp.zeros(shape, jnp.float32)
    if "concat" in cond:
        x = jnp.concatenate([x, cond["concat"]], axis=-1)
    params["unet"] = init_from_one_draw(
        lambda k: model.unet.init({"params": k}, x, jnp.zeros((1,), jnp.int32),
                                  labels=labels, context=context,
                                  context_mask=cond.get("mask") if model.text_encoder else None),
        init_rng)["params"]
    return TrainState.create(params, tx, state_rng)


def training_cond(config, first, frozen, batch, key, empty_tokens, empty_context=None):
    """Conditioning inputs of one batch: labels and captions withheld with probability
    conditioning.p_uncond (labels -> DROPPED, captions -> the empty caption; cached text
    context -> the empty caption's), and the concat inputs built from the images."""
    c = config.conditioning
    images = batch.get("image")
    b = (images if images is not None else batch["latents"]).shape[0]
    drop_key, mask_key, encode_key = jax.random.split(key, 3)
    drop = jax.random.bernoulli(drop_key, c.p_uncond, (b, 1))
    cond = {}
    if "labels" in batch:
        cond["labels"] = jnp.where(drop, DROPPED, batch["labels"])
    if c.text:
        empty_ids, empty_mask = (jnp.asarray(a[0]) for a in empty_tokens)
        cond["ids"] = jnp.where(drop, empty_ids[None], batch["ids"])
        cond["mask"] = jnp.where(drop, empty_mask[None], batch["mask"])
    if "context" in batch:  # a latent cache's frozen-encoder hidden states
        cond["context"] = jnp.where(drop[:, :, None], empty_context[None],
                                    batch["context"].astype(jnp.float32))
    if c.concat == "inpaint":
        mask = concat_inputs.random_masks(mask_key, b, images.shape[1], c.inpaint_full_mask_prob)
        cond["concat"] = inpaint_input(first, frozen, images, mask, encode_key)
    elif c.concat == "lowres":
        cond["concat"] = concat_inputs.lowres_input(concat_inputs.downsample(images),
                                                    first.factor)
    return cond


def inpaint_input(first, frozen, images, mask, key):
    """The inpainting model's extra channels: [latent mask, latents of the masked image]."""
    masked = first.encode(frozen, concat_inputs.masked_images(images, mask), key)
    return jnp.concatenate([concat_inputs.mask_to_latent(mask, first.factor), masked], axis=-1)


def make_train_step(config, model: LatentModel, first, schedule, tx, lr_fn, empty_tokens,
                    mesh=None, empty_context=None):
    """step(state, batch, frozen) -> (state, metrics). `frozen` holds the first stage's params
    under "first_stage", and the parts of the model that are not trained (a pretrained text
    encoder) under their param names."""
    d = config.diffusion
    accum = config.optimizer.grad_accum_steps

    def loss_fn(params, z0, t, noise, cond, dropout_key, fixed):
        params = {**params, **fixed}
        apply = lambda x_t, tt: model.apply(params, x_t, tt, cond, train=True,
                                            rngs={"dropout": dropout_key},
                                            context=cond.get("context"))
        loss, _ = objectives.diffusion_loss(apply, schedule, z0, None,
                                            parameterization=d.parameterization,
                                            weighting=d.loss_weighting, snr_gamma=d.snr_gamma,
                                            t=t, noise=noise)
        return loss

    grad_fn = jax.value_and_grad(loss_fn)

    def train_step(state: TrainState, batch, frozen):
        key = jax.random.fold_in(state.rng, state.step)
        encode_key, noise_key, dropout_key, cond_key = jax.random.split(key, 4)
        first_params = frozen["first_stage"]
        fixed = {k: v for k, v in frozen.items() if k != "first_stage"}
        if "latents" in batch:  # a latent cache: the same key draws the same sample
            z0 = first.from_cache(batch["latents"], encode_key)
        else:
            z0 = first.encode(first_params, batch["image"], encode_key)
        cond = training_cond(config, first, first_params, batch, cond_key, empty_tokens,
                             empty_context)
        # t and noise for the whole batch, so micro-batches see one large batch's draws.
        t, noise = objectives.draw_t_and_noise(schedule, noise_key, z0.shape,
                                                sampling=d.timestep_sampling,
                                                logit_mean=d.logit_mean, logit_std=d.logit_std)
        if accum == 1:
            loss, grads = grad_fn(state.params, z0, t, noise, cond, dropout_key, fixed)
        else:
            loss, grads = _accumulate(lambda *a: grad_fn(*a, fixed), state.params,
                                      (z0, t, noise, cond), dropout_key, accum, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_after_step(state.ema_params, params, state.step, config.training)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return new_state, metrics

    return train_step


def _accumulate(grad_fn, params, inputs, dropout_key, accum, mesh):
    """Mean loss and grads over `accum` strided micro-batches (row i*accum + j goes to
    micro-batch j, so each stays spread over the data axis)."""
    split = lambda a: a.reshape(a.shape[0] // accum, accum, *a.shape[1:]).swapaxes(0, 1)
    micro = jax.tree_util.tree_map(split, inputs)
    if mesh is not None:
        micro = jax.tree_util.tree_map(
            lambda m: jax.lax.with_sharding_constraint(m, NamedSharding(mesh, P(None, BATCH_AXES))),
            micro)

    def body(carry, xs):
        loss_sum, grad_sum = carry
        j, (z0, t, noise, cond) = xs
        loss, grads = grad_fn(params, z0, t, noise, cond, jax.random.fold_in(dropout_key, j))
        return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(accum), micro))
    return loss / accum, jax.tree_util.tree_map(lambda g: g / accum, grads)
