"""orbax checkpoints in the workdir: train state, data-iterator state, loop counters and config,
keep-N, async.

orbax writes each step into a temporary folder and renames it only when complete, so a process
killed mid-save leaves the previous step as the latest usable checkpoint; the temporary folders
such a kill leaves behind are deleted when the workdir is opened again for training. Readers
(sampling, evaluation) open it read-only and never delete anything: a training run may be writing
into one of those folders at that moment.
"""
from __future__ import annotations

import os
import shutil

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
_UNFINISHED_MARK = ".orbax-checkpoint-tmp"


def remove_unfinished_saves(directory: str) -> list[str]:
    """Delete the temporary step folders a killed save left in `directory`; returns their names.

    Done here, synchronously and before any save, rather than by orbax's background clean-up:
    that one runs concurrently with whatever opens the directory next and fails when two
    managers race to delete the same folder."""
    if not os.path.isdir(directory):
        return []
    stale = sorted(n for n in os.listdir(directory) if _UNFINISHED_MARK in n)
    for name in stale:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    return stale


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True,
                 read_only: bool = False):
        """`read_only`: open for restoring only (no saves, no clean-up of unfinished saves)."""
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        if not read_only and jax.process_index() == 0:
            remove_unfinished_saves(self.directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                               read_only=read_only,
                                               cleanup_tmp_directories=False,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, config_dict: dict,
             counters: dict | None = None) -> None:
        """`counters`: the loop's own running totals (e.g. skipped non-finite steps)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config_dict),
            counters=ocp.args.JsonSave(counters or {})))

    def stored_config(self, step: int) -> dict:
        """The config dict saved with checkpoint `step`."""
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def counters(self, step: int) -> dict:
        """The loop counters saved with `step` ({} for checkpoints written before they existed)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "counters")):
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(
            counters=ocp.args.JsonRestore())).counters

    def restore(self, abstract_state, step: int | None = None):
        """Restore (state, data_state) at `step` (default latest) onto the shardings in `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
        return restored.state, restored.data

    def restore_subtree(self, name: str, abstract_subtree, step: int | None = None):
        """Restore only the train-state field `name` (e.g. "ema_params") of checkpoint `step`
        (default latest) onto the shardings in `abstract_subtree`; nothing else is read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        item = {name: abstract_subtree}
        restore_args = jax.tree_util.tree_map(
            lambda a: ocp.ArrayRestoreArgs(dtype=a.dtype, sharding=a.sharding), item)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                         partial_restore=True)))
        return restored.state[name]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_sharding(abstract_tree, shardings):
    """ShapeDtypeStructs carrying target shardings, so restored arrays land where the step wants them."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
