"""What a stage supplies to the one train loop and to sample.py.

A stage is a module named in `config_utils.STAGES` with these functions:

    default_config() -> ConfigDict   the fields an old workdir's config.json is merged into
    validate(config)                 all of the stage's config checks; raises ConfigError
    build_run(config, mesh, workdir, source, is_main) -> StageRun
    sample(workdir, config, options) -> str   what sample.py does with a workdir; returns
                                              the line it prints
    image_maker(config, mesh, workdir) -> ImageMaker   how evaluation gets images from params
    load_for_evaluation(workdir, config, mesh, step, use_ema) -> (params, step)
    abstract_run(config, mesh) -> (StageRun, batch, frozen, notes)   optional: the step with
                                     its global batch and frozen inputs as ShapeDtypeStructs,
                                     built without data or weights (python -m ldm_jax.memory)

The loop, checkpoints, metrics and multi-host code only ever see a StageRun.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class StageRun:
    # key -> train state (a pytree with a `step` field and a `replace` method); jitted by the loop
    init: Callable[[Any], Any]
    # (state, batch, frozen) -> (state, metrics of float scalars); jitted, sharded and donated
    # by the loop
    train_step: Callable[[Any, dict, Any], tuple]
    # abstract train state -> one line for the log, e.g. "U-Net: 1,113,955 parameters"
    describe: Callable[[Any], str]
    # dataset labels the input pipeline must carry under batch["labels"]
    label_keys: tuple = ()
    # record -> {name: numpy array} of further per-example inputs the input pipeline adds to
    # the batch (e.g. caption tokens); None adds nothing
    record_fields: Callable[[dict], dict] | None = None
    # parameters the step reads but never trains (LPIPS, a first-stage autoencoder, a text
    # encoder): placed once, replicated, passed to every step, not checkpointed
    frozen: Any = None
    # metrics shown on the console line, in order (all of them go to metrics.jsonl and
    # TensorBoard); None shows all
    console_keys: tuple | None = None
    # (state, step) -> notes; writes sample grids / evaluations every training.sample_every steps
    periodic: Callable[[Any, int], list] | None = None
    # (state, step) -> notes; runs once when the run reaches training.num_steps
    finish: Callable[[Any, int], list] | None = None
    # (state, step) -> ({metric: float}, notes); every `evaluate_every` steps and at the end.
    # The loop logs the figures to metrics.jsonl, TensorBoard and eval.jsonl
    evaluate: Callable[[Any, int], tuple] | None = None
    evaluate_every: int = 0
