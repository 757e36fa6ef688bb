"""The one train loop shared by every stage.

config -> data -> model -> loss -> sharded jitted step -> checkpoints, metrics and sample grids.
Every process runs this same code; each feeds only its own rows of the global batch.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from ldm_jax import config_utils, parallel
from ldm_jax.checkpoint import Checkpointer, abstract_with_sharding
from ldm_jax.config_checks import ConfigError
from ldm_jax.data import pipeline
from ldm_jax.training import resume_check
from ldm_jax.training.metrics_logger import MetricLogger
from ldm_jax.training.preemption import StopRequest
from ldm_jax.training.step_guard import StepWatch, TrainingDivergedError, guard_step
from ldm_jax.utils.memory import release_freed_heap


def _load_data(config):
    """Process 0 prepares the embedded dataset first; the others then find it on a shared
    filesystem, or prepare their own identical copy (it is deterministic) on a local one."""
    if jax.process_index() == 0:
        source = pipeline.load_source(config.data, prepare=True, square=False)
    parallel.wait_for_all_processes("data_prepared")
    if jax.process_index() != 0:
        source = pipeline.load_source(config.data, prepare=True, square=False)
    return source


def _with_class_names(config, source):
    """A class-folder dataset's names go into the config, and so into the workdir, where
    sampling finds them. A run resumed on class folders that changed is refused."""
    names = tuple(getattr(source, "class_names", None) or ())
    known = tuple(config.data.class_names)
    if not names or known == names:
        return config
    if known:
        raise ConfigError(f"the class folders of {config.data.path} changed since this run "
                          f"started (classes {list(known)}, now {list(names)}); labels would "
                          "mean other classes: restore the folders or use a new --workdir")
    config = config.copy_and_resolve_references()
    config.data.class_names = names
    return config


def _stored_class_names(ckpt, step: int, config):
    """The class names a resumed run recorded (the command line leaves them empty)."""
    stored = ckpt.stored_config(step).get("data", {}).get("class_names") or ()
    if not stored or tuple(config.data.class_names):
        return config
    config = config.copy_and_resolve_references()
    config.data.class_names = tuple(stored)
    return config


def _check_resume(ckpt, step: int, config, allow_changes) -> list[str]:
    """Notes on the config changes since checkpoint `step`; ConfigError for unmeant ones.
    Class names are filled in from the data after this check (see _stored_class_names)."""
    stored = config_utils.config_from_dict(ckpt.stored_config(step))
    if not tuple(config.data.class_names):
        stored.data.class_names = ()
    notes = resume_check.check_resume(stored.to_dict(), config.to_dict(), step, allow_changes)
    note = resume_check.num_steps_note(stored, config, step)
    return notes + ([note] if note else [])


def _restore(ckpt, abstract, state_sharding, step, changed: bool):
    try:
        return ckpt.restore(abstract_with_sharding(abstract, state_sharding), step)
    except (ValueError, KeyError, TypeError) as e:
        if not changed:
            raise
        raise config_utils.ConfigError(
            f"the checkpoint at step {step} does not fit the changed config "
            f"({str(e).splitlines()[0][:160]}); these changes need a new --workdir") from None


def train(config, workdir: str, devices=None, stop_at: int | None = None,
          allow_changes=()) -> list[dict]:
    """Train (or resume) in `workdir`; returns the metrics logged by this run.

    `devices` restricts the mesh (default: all devices of all processes); `stop_at` ends the run
    after that step as if the job had been pre-empted (checkpointing there first);
    `allow_changes` names config fields that may differ from the checkpoint being resumed.
    SIGTERM or SIGINT, from start-up to the last save, stop the run the same way at a step all
    processes agree on.
    """
    with StopRequest() as stop_request:
        return _train(config, workdir, devices, stop_at, allow_changes, stop_request)


def _train(config, workdir, devices, stop_at, allow_changes, stop_request) -> list[dict]:
    stage = config_utils.stage_module(config.stage)
    stage.validate(config)
    t = config.training
    mesh = parallel.make_mesh(devices, config.get("parallel"))
    is_main = jax.process_index() == 0
    config_utils.check_batch_divides(t.batch_size, mesh.devices.size, jax.process_count(),
                                     config.optimizer.grad_accum_steps)
    ckpt = Checkpointer(workdir, t.keep_checkpoints, t.async_checkpointing)
    latest = ckpt.latest_step()
    # Nothing in the workdir changes before this check has passed.
    resume_notes = [] if latest is None else _check_resume(ckpt, latest, config, allow_changes)
    if latest is not None:
        config = _stored_class_names(ckpt, latest, config)

    source = _load_data(config)
    config = _with_class_names(config, source)
    run = stage.build_run(config, mesh, workdir, source, is_main)
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(run.init, rng)
    state_sharding = parallel.state_sharding(mesh, abstract, config.get("parallel"))
    data_iter = pipeline.make_train_iterator(source, config.data, t.batch_size, config.seed,
                                             jax.process_index(), jax.process_count(),
                                             run.label_keys, run.record_fields)

    start = time.time()
    counters = {}
    if latest is None:
        state = jax.jit(run.init, out_shardings=state_sharding)(rng)
        origin = "initialised"
        if t.init_from:
            from ldm_jax.training.init_from import start_from
            state, origin = start_from(state, t.init_from, state_sharding)
    else:
        state, data_state = _restore(ckpt, abstract, state_sharding, latest,
                                     changed=bool(resume_notes))
        data_iter.set_state(data_state)
        counters = ckpt.counters(latest)
        origin = f"resumed from step {latest}"
    if is_main:
        config_utils.save_config(config, workdir)
    first_step = int(jax.device_get(state.step))

    logger = MetricLogger(workdir, t.num_steps, first_step, t.batch_size, is_main, t.progress_bar,
                          run.console_keys)
    logger.note(f"{run.describe(abstract)}; {origin} in "
                f"{time.time() - start:.1f}s; {_mesh_words(mesh)}, {jax.process_count()} "
                f"process(es), global batch {t.batch_size}")
    for note in resume_notes:
        logger.note(note)
    if hasattr(source, "describe"):  # user data: what was found, what the filters dropped
        logger.note(f"data: {source.describe()}")
    if first_step >= t.num_steps:
        logger.note(f"already trained to step {first_step} (training.num_steps={t.num_steps}); "
                    "raise --config.training.num_steps to train further")
    try:
        history = _run_steps(config, run, mesh, state, state_sharding, data_iter, ckpt, logger,
                             first_step, stop_at, counters, stop_request,
                             getattr(source, "skipped", None))
    except TrainingDivergedError as e:
        ckpt.wait()  # let a save of an earlier, finite state finish
        last = ckpt.latest_step()
        kept = (f"the last checkpoint, step {last} in {ckpt.directory}, is intact" if last
                else "no checkpoint was written")
        raise TrainingDivergedError(
            f"{e}; stopped: {kept}. Lower optimizer.lr or compute in float32, or set "
            "training.skip_nonfinite_steps=True to skip such steps") from None
    finally:
        logger.close()
    ckpt.close()
    return history


def _mesh_words(mesh) -> str:
    data, fsdp = mesh.devices.shape
    return (f"{mesh.devices.size} devices" if fsdp == 1 else
            f"{mesh.devices.size} devices as data {data} x fsdp {fsdp}")


def jit_step(run, mesh, state_sharding, skip_nonfinite: bool):
    """The stage's step as the loop runs it: guarded, jitted over `mesh`, state donated;
    (state, batch, frozen, stop_flags) -> (state, metrics, controls)."""
    return jax.jit(guard_step(run.train_step, skip_nonfinite),
                   in_shardings=(state_sharding, parallel.batch_sharding(mesh),
                                 parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                   out_shardings=(state_sharding, parallel.replicated(mesh),
                                  parallel.replicated(mesh)),
                   donate_argnums=(0,))


def _run_steps(config, run, mesh, state, state_sharding, data_iter, ckpt, logger, first_step,
               stop_at, counters, stop_request, skipped=None) -> list[dict]:
    """`skipped`: the source's count of unreadable files (image_files.SkipCounter), if any."""
    t = config.training
    reported_skips = 0
    frozen = jax.device_put(run.frozen, parallel.replicated(mesh))
    step_fn = jit_step(run, mesh, state_sharding, t.skip_nonfinite_steps)
    watch = StepWatch(t.skip_nonfinite_steps, counters.get("nonfinite_skipped", 0), logger.note)
    n_local = parallel.local_device_count(mesh)
    start = time.time()
    history, pending = [], []
    last_step = t.num_steps if stop_at is None else min(stop_at, t.num_steps)
    for step in range(first_step, last_step):
        batch = parallel.global_batch(next(data_iter), mesh)
        flags = parallel.global_flags(stop_request.local_flags(n_local), mesh)
        if step == first_step:
            # Compile ahead, then start the first step on every process at once.
            step_fn = step_fn.lower(state, batch, frozen, flags).compile()
            parallel.wait_for_all_processes("train_step_compiled")
        state, metrics, controls = step_fn(state, batch, frozen, flags)
        watch.push(step + 1, metrics, controls)
        # At most one step in flight: the bar counts finished steps, and the host does
        # not queue up batches and buffers ahead of the device.
        pending += watch.settle(keep_newest=True)
        logger.advance()
        done = step + 1
        if step == first_step:
            jax.block_until_ready(metrics)
            release_freed_heap()
            logger.note(f"first step (with compilation) took {time.time() - start:.1f}s")
            logger.reset_timer(done)
        log_due = done % t.log_every == 0 or done == t.num_steps
        save_due = done % t.checkpoint_every == 0 or done == last_step
        if log_due or save_due or watch.stop_requested:
            pending += watch.settle()  # before a save: never checkpoint a diverged state
        stopping = watch.stop_requested and done < last_step
        if pending and (log_due or stopping):
            # One host transfer per interval; per-step values are averaged for the log line.
            finite = [jax.device_get(m) for _, m, ok in pending if ok]
            if finite:
                mean = {k: np.mean([float(m[k]) for m in finite]) for k in finite[0]}
                if t.skip_nonfinite_steps:
                    mean["nonfinite_skipped"] = watch.skipped
                history.append({"step": done, **logger.log(done, mean)})
            pending = []
            if skipped is not None and skipped.count > reported_skips:
                reported_skips = skipped.count
                logger.note(f"skipped {skipped.count} unreadable image file(s) so far, each "
                            f"replaced by the next readable one (last: {skipped.last})")
        if save_due or stopping:
            ckpt.save(done, state, data_iter.get_state(), config.to_dict(),
                      {"nonfinite_skipped": watch.skipped})
        if stopping:
            ckpt.wait()
            cause = (f"{stop_request.signal_name} received" if stop_request.signal_name
                     else "another process was signalled")
            logger.note(f"stopped at step {done} ({cause}): checkpoint saved in "
                        f"{ckpt.directory}; run the same command again to continue")
            break
        if run.periodic and (done % t.sample_every == 0 or done == t.num_steps):
            for note in run.periodic(state, done):
                logger.note(note)
            logger.reset_timer(done)
        if run.evaluate and (done % run.evaluate_every == 0 or done == t.num_steps):
            figures, notes = run.evaluate(state, done)
            for note in notes:
                logger.note(note)
            logger.log_eval(done, figures)
            logger.reset_timer(done)
        if run.finish and done == t.num_steps:
            for note in run.finish(state, done):
                logger.note(note)
    return history
