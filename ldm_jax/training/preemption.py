"""Pre-emption: SIGTERM or SIGINT asks the run to checkpoint and stop; a second signal exits now.

A signal reaches each process of a job at a different moment (or only one of them), yet all
must save the same step. So the request is not acted on where it lands: every step carries each
process's flag into the jitted program, which takes the maximum over the mesh, and every process
reads that agreed value back at the same point of the loop.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers for the length of a `with` block; `requested` is this process's flag."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # Python allows no other
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"{name} again: exiting now without saving; the last complete checkpoint is kept",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.requested, self.signal_name = True, name
        print(f"{name} received: stopping after the current step with a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)

    def local_flags(self, num_local_devices: int) -> np.ndarray:
        """This process's rows of the per-device flag array the step reduces over the mesh."""
        return np.full((num_local_devices,), int(self.requested), np.int32)
