"""Metrics a person can read: a tqdm bar, one stdout line per log interval, TensorBoard events
(through tensorboardX, which needs no TensorFlow) and a metrics.jsonl for scripts.

A resumed run logs each step once: records past the restored step (written after that
checkpoint by the run that was stopped) are dropped from metrics.jsonl, and TensorBoard is told
to purge its own from the new event file on.
"""
from __future__ import annotations

import json
import os
import sys
import time

import tqdm

EVAL_FILE = "eval.jsonl"  # evaluation records: periodic ones and python -m ldm_jax.evaluate's


class MetricLogger:
    def __init__(self, workdir: str, total_steps: int, start_step: int, batch_size: int,
                 is_main: bool, progress_bar: bool = True, console_keys=None):
        self.is_main, self.workdir = is_main, workdir
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.console_keys = console_keys  # metrics shown on the console line (None: all)
        self._last_step, self._last_time = start_step, time.time()
        self.bar = self.writer = self.jsonl = None
        if not is_main:
            return
        from tensorboardX import SummaryWriter
        resumed = start_step > 0
        self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                    purge_step=start_step + 1 if resumed else None)
        path = os.path.join(workdir, "metrics.jsonl")
        if resumed:
            drop_records_after(path, start_step)
            drop_records_after(os.path.join(workdir, EVAL_FILE), start_step)
        self.jsonl = open(path, "a")
        if progress_bar:
            self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                                 dynamic_ncols=True, file=sys.stderr)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict) -> dict:
        """Log scalar metrics for `step`, adding images/s since the previous call."""
        now = time.time()
        steps = max(step - self._last_step, 1)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["images_per_sec"] = steps * self.batch_size / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        if not self.is_main:
            return metrics
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        # "loss" first, the rest by name (jitted steps return their metrics sorted anyway).
        if self.console_keys:
            names = [k for k in self.console_keys if k in metrics]
        else:
            names = sorted((k for k in metrics if k != "images_per_sec"),
                           key=lambda k: (k != "loss", k))
        shown = [f"{k} {_format(k, metrics[k])}" for k in names]
        line = " | ".join([f"step {step}/{self.total_steps}", *shown,
                           f"{metrics['images_per_sec']:.1f} img/s"])
        if self.bar is not None:
            first = names[0]
            self.bar.set_postfix({first: _format(first, metrics[first]),
                                  "img_s": f"{metrics['images_per_sec']:.1f}"})
            self.bar.write(line)
        else:
            print(line, flush=True)
        return metrics

    def log_eval(self, step: int, figures: dict) -> None:
        """Evaluation figures: TensorBoard under eval/, metrics.jsonl as eval/NAME, and
        eval.jsonl (the file `python -m ldm_jax.evaluate` appends to), plus one console line."""
        if not self.is_main:
            return
        figures = {k: float(v) for k, v in figures.items()}
        for k, v in figures.items():
            self.writer.add_scalar(f"eval/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, **{f"eval/{k}": v for k, v in
                                                      figures.items()}}) + "\n")
        self.jsonl.flush()
        with open(os.path.join(self.workdir, EVAL_FILE), "a") as f:
            f.write(json.dumps({"step": step, "source": "training", **figures}) + "\n")
        self.note(" | ".join([f"eval at step {step}"] +
                             [f"{k} {_format(k, v)}" for k, v in figures.items()]))

    def note(self, message: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def reset_timer(self, step: int) -> None:
        """Exclude pauses (compilation, checkpoint, sampling) from images/s."""
        self._last_step, self._last_time = step, time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
            self.jsonl.close()


def _format(name: str, value: float) -> str:
    """Readable at a glance: learning rates in exponent form, counts as integers, the rest
    with four significant digits (or four decimals for losses, whose changes are small)."""
    if name == "lr" or name.endswith("_lr"):
        return f"{value:.2e}"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    if name == "loss" or name.endswith("_loss"):
        return f"{value:.4f}"
    if name == "grad_norm":
        return f"{value:.3f}"
    return f"{value:.4g}"


def drop_records_after(path: str, step: int) -> None:
    """Keep only the records of steps <= `step` in a metrics.jsonl (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            pass  # a line cut off by a kill mid-write
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
