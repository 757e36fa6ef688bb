"""The latent-diffusion step without its data or frozen weights, for planning memory
(`python -m ldm_jax.memory`): the first stage and a pretrained text encoder are built from
their configs as shapes only, so a run can be sized before its parts exist.
"""
from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp

from ldm_jax.config_checks import ConfigError
from ldm_jax.stages import first_stage as first_stage_lib
from ldm_jax.stages.api import StageRun
from ldm_jax.training import ldm_step
from ldm_jax.training.optimizer import make_optimizer

# The CLIP BPE vocabulary (SD v1/v2 text encoders): assumed when no tokenizer is on disk.
CLIP_VOCAB = 49408
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config_file(path: str):
    for candidate in (path, os.path.join(_ROOT, path)):
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("first_stage_config", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module.get_config()
    raise ConfigError(f"first_stage.config={path} is not a file; name the autoencoder's "
                      "config so its shapes can be built")


def _autoencoder_config(config):
    """The first stage's config: its workdir's when it exists, else first_stage.config."""
    from ldm_jax import config_utils
    workdir = os.path.expanduser(config.first_stage.workdir)
    if os.path.isfile(os.path.join(workdir, config_utils.CONFIG_FILE)):
        return config_utils.load_config(workdir)
    return _config_file(config.first_stage.config)


def abstract_first_stage(config) -> first_stage_lib.FirstStage:
    from ldm_jax.models.autoencoder import downsampling_factor
    from ldm_jax.stages import autoencoder
    ae_config = _autoencoder_config(config)
    ae_config.data.image_size = config.data.image_size
    model, state = autoencoder.abstract_state(ae_config)
    params = {"params": state.params, "model_state": state.model_state}
    return first_stage_lib.FirstStage(
        model=model, kind=ae_config.model.kind, scale=1.0, posterior=config.first_stage.posterior,
        factor=downsampling_factor(ae_config.model.ch_mult), channels=ae_config.model.embed_dim,
        step=0, workdir="", params=params)


class _Tokens:
    """What the step needs of a tokenizer: its vocabulary size and the empty caption."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = vocab_size, max_length

    def encode(self, texts, warn=None):
        n, length = len(texts), self.max_length
        return jnp.zeros((n, length), jnp.int32), jnp.ones((n, length), bool)


def _text_parts(config, notes):
    """(tokens, frozen text module or None, its abstract params or None)."""
    if not config.conditioning.text:
        return None, None, None
    te = config.text_encoder
    folder = os.path.expanduser(te.pretrained)
    vocab = CLIP_VOCAB
    if te.pretrained and os.path.isdir(folder):
        from ldm_jax.models import text_encoder_io
        module, params, _ = text_encoder_io.load_pretrained(folder)
        vocab = module.vocab_size
        params = jax.eval_shape(lambda: params)
        return _Tokens(vocab, te.max_length), module, params
    notes.append(f"text vocabulary assumed {vocab:,} (CLIP's BPE): no tokenizer on disk")
    if not te.pretrained:
        return _Tokens(vocab, te.max_length), None, None
    from ldm_jax.models.text_encoder import TextTransformer
    module = TextTransformer(vocab_size=vocab, max_length=te.max_length, width=te.width,
                             depth=te.depth, heads=te.heads, causal=te.causal)
    ids = jnp.zeros((1, te.max_length), jnp.int32)
    params = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids)["params"])
    return _Tokens(vocab, te.max_length), module, params


def abstract_run(config, mesh):
    """(StageRun, global batch as ShapeDtypeStructs, abstract frozen inputs, notes)."""
    notes = []
    first = abstract_first_stage(config)
    tok, text_module, text_params = _text_parts(config, notes)
    model, schedule = ldm_step.build_parts(config, first, tok, text_module)
    frozen = {"first_stage": first.params}
    if text_params is not None:
        frozen["text_encoder"] = text_params
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    b, s = config.training.batch_size, config.data.image_size
    latent = first_stage_lib.latent_shape(config, first, b)
    batch = {"image": jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)}
    if config.data.name == "latents":  # a cache: posterior moments (KL) or VQ latents
        channels = latent[-1] * (2 if first.kind == "kl" else 1)
        batch = {"latents": jax.ShapeDtypeStruct((*latent[:3], channels), jnp.float32)}
    if config.model.label_keys:
        batch["labels"] = jax.ShapeDtypeStruct((b, len(config.model.label_keys)), jnp.int32)
    if config.conditioning.text:
        L = config.text_encoder.max_length
        batch["ids"] = jax.ShapeDtypeStruct((b, L), jnp.int32)
        batch["mask"] = jax.ShapeDtypeStruct((b, L), jnp.bool_)
    step = ldm_step.make_train_step(config, model, first, schedule, tx, lr_fn,
                                    ldm_step.empty_tokens(tok), mesh)
    run = StageRun(init=lambda key: ldm_step.init_state(config, model, tx, key, latent,
                                                        frozen_text=text_params is not None),
                   train_step=step, describe=lambda abstract: "")
    return run, batch, frozen, notes
