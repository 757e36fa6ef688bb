"""The latent-diffusion stage: a U-Net trained on the latents of a frozen first stage,
conditioned by text (a jointly trained encoder), labels, and/or concat inputs.

Sampling (grids during training, sample.py, evaluation) goes through
`pipelines/latent.py`; sample.py's tasks live in `stages/ldm_sample.py`.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from ldm_jax.stages import first_stage as first_stage_lib
from ldm_jax.stages import ldm_checks, ldm_text
from ldm_jax.stages.api import StageRun
from ldm_jax.training import ldm_step
from ldm_jax.training.ldm_step import build_parts, empty_tokens
from ldm_jax.training.optimizer import make_optimizer


def default_config():
    from configs import ldm_base
    return ldm_base.get_config()


def validate(config) -> None:
    ldm_checks.validate(config)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def build_run(config, mesh, workdir: str, source, is_main: bool) -> StageRun:
    ldm_checks.check_training_data(config, source)
    record = first_stage_lib.read_record(workdir)
    first = first_stage_lib.load(config, mesh, record)
    if record is None and is_main:
        first_stage_lib.write_record(first, workdir)
    tok, text_module, text_params = ldm_text.text_parts(config, workdir, source, is_main)
    model, schedule = build_parts(config, first, tok, text_module)
    frozen = {"first_stage": first.params}
    fixed = {}  # untrained parts of the model, merged into the params wherever they are used
    if text_params is not None:
        from ldm_jax import parallel
        fixed["text_encoder"] = jax.device_put(text_params, parallel.replicated(mesh))
        frozen.update(fixed)
    tx, lr_fn = make_optimizer(config.optimizer, config.training.num_steps)
    shape = first_stage_lib.latent_shape(config, first, 1)
    empty_context = None
    if config.data.name == "latents":
        empty_context = _check_cache(config, first, model, fixed, tok)
    step = ldm_step.make_train_step(config, model, first, schedule, tx, lr_fn,
                                    empty_tokens(tok), mesh, empty_context)

    def describe(abstract):
        parts = [f"latent U-Net: {_count(abstract.params['unet']):,} parameters"]
        if "text_encoder" in abstract.params:
            parts.append(f"text encoder {_count(abstract.params['text_encoder']):,} "
                         f"(vocabulary {tok.vocab_size})")
        if fixed:
            parts.append(f"frozen pretrained text encoder {_count(fixed['text_encoder']):,} "
                         f"(vocabulary {tok.vocab_size})")
        if "class_embedder" in abstract.params:
            parts.append(f"class tokens {_count(abstract.params['class_embedder']):,}")
        parts.append(f"frozen {first.kind.upper()}-f{first.factor} first stage (step "
                     f"{first.step}, latents {shape[1]}x{shape[2]}x{shape[3]}, scale "
                     f"{first.scale:.5f})")
        return "; ".join(parts)

    from ldm_jax.stages.ldm_sample import GridWriter, image_maker_for
    grids = GridWriter(config, model, first, schedule, mesh, workdir, is_main, tok, fixed)
    evaluate = None
    if config.eval.every:
        from ldm_jax.evaluation.evaluator import training_evaluator
        evaluate = training_evaluator(
            config, mesh, image_maker_for(config, mesh, model, first, schedule, tok),
            lambda state: {**(state.ema_params if config.sampling.use_ema else state.params),
                           **fixed})
    return StageRun(
        init=lambda key: ldm_step.init_state(config, model, tx, key, shape,
                                             frozen_text=bool(fixed)),
        train_step=step,
        describe=describe,
        label_keys=tuple(config.model.label_keys),
        record_fields=ldm_text.record_fields(tok) if tok else None,
        frozen=frozen,
        periodic=grids if config.training.sample_every else None,
        evaluate=evaluate, evaluate_every=config.eval.every)


def abstract_run(config, mesh):
    """The step without data or frozen weights, for planning memory (see ldm_plan.py)."""
    from ldm_jax.stages.ldm_plan import abstract_run as plan
    return plan(config, mesh)


def _check_cache(config, first, model, fixed, tok):
    """A latent cache must come from this run's first stage (and frozen text encoder); returns
    the empty caption's context when the cache holds text context (what dropped captions get)."""
    from ldm_jax.config_checks import ConfigError
    from ldm_jax.data.latents_source import read_meta
    meta = read_meta(config.data.path)
    made = meta["first_stage"]
    if (made["workdir"], int(made["step"])) != (first.workdir, first.step) or \
            abs(float(made["scale"]) - first.scale) > 1e-12 or made["posterior"] != first.posterior:
        raise ConfigError(f"the latent cache {config.data.path} was made with the first stage "
                          f"{made['workdir']} (step {made['step']}, scale {made['scale']:.6g}, "
                          f"{made['posterior']}); this run's is {first.workdir} (step "
                          f"{first.step}, scale {first.scale:.6g}, {first.posterior}): write "
                          "the cache again with this first stage")
    if not meta.get("text_encoder"):
        return None
    if meta["text_encoder"] != os.path.abspath(config.text_encoder.pretrained):
        raise ConfigError(f"the latent cache {config.data.path} holds text context from "
                          f"{meta['text_encoder']}, not text_encoder.pretrained="
                          f"{config.text_encoder.pretrained}")
    ids, mask = empty_tokens(tok)
    return jax.jit(model.encode_text)(fixed, ids, mask)[0]


def image_maker(config, mesh, workdir: str):
    """Evaluation's sampler for the workdir's model (its first stage and tokenizer)."""
    from ldm_jax.stages.ldm_sample import image_maker as make
    return make(config, mesh, workdir)


def load_for_evaluation(workdir: str, config, mesh, step=None, use_ema: bool = True):
    from ldm_jax.stages.ldm_sample import load_workdir
    loaded = load_workdir(workdir, config, mesh, step, use_ema)
    return loaded.params, loaded.step


def sample(workdir: str, config, options: dict) -> str:
    from ldm_jax.stages.ldm_sample import sample_workdir
    return sample_workdir(workdir, config, options)
