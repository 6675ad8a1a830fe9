"""Preemption: SIGTERM (Slurm's `scancel` and preemption, a spot instance's notice, Kubernetes
evicting a pod, `torchrun` stopping its workers) ends the run with a checkpoint, not a lost stretch.

The signal only sets a flag. After each batch, before Composer's checkpoint saver runs, the ranks
agree (one all-reduce: any rank signalled), stop training (no end-of-run evaluation) and let the saver
write this batch's checkpoint as the last one; `fit` then raises `Preempted`. A relaunch resumes from that checkpoint.
`preemption_grace_period` bounds it: if the process has not left that many seconds after the
signal (a long batch, a save that hangs), it says so and exits, before the scheduler's SIGKILL would
leave no word; the partial checkpoint is set aside on the next launch.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from typing import Optional

import torch
from composer.core import Callback
from composer.utils import dist

from llmfoundry_lite.errors import UserError

log = logging.getLogger(__name__)


class Preempted(UserError):
    """The run was asked to stop (SIGTERM) and saved a checkpoint to resume from."""
    exit_code = 128 + signal.SIGTERM  # what a process ended by SIGTERM reports to its scheduler


class PreemptionSave(Callback):
    """Must run before Composer's CheckpointSaver on BATCH_CHECKPOINT (entry.py inserts it there)."""

    def __init__(self, grace_period: float):
        self.grace_period = grace_period
        self.signalled_at: Optional[float] = None
        self.stopped_at: Optional[int] = None
        self._previous = None
        self._left = threading.Event()

    def fit_start(self, state, logger) -> None:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if self.signalled_at is not None:
            return
        self.signalled_at = time.monotonic()
        print(f"rank {dist.get_global_rank()}: SIGTERM received: saving a checkpoint after this batch "
              f"(preemption_grace_period {self.grace_period:g} s)", file=sys.stderr, flush=True)
        threading.Thread(target=self._deadline, name="preemption-deadline", daemon=True).start()

    def _deadline(self) -> None:
        if self._left.wait(self.grace_period):
            return
        message = (f"preemption: no checkpoint was completed within preemption_grace_period ({self.grace_period:g} s) "
                   "after SIGTERM; exiting without one. The relaunch resumes from the last complete checkpoint; raise "
                   "preemption_grace_period (and the scheduler's grace time) if a batch and a save take longer")
        print(f"error: {message}", file=sys.stderr, flush=True)
        os._exit(Preempted.exit_code)

    def batch_checkpoint(self, state, logger) -> None:
        flag = state.device.tensor_to_device(torch.tensor([0 if self.signalled_at is None else 1], dtype=torch.int32))
        dist.all_reduce(flag, reduce_operation="MAX")
        if flag.item():
            self.stopped_at = state.timestamp.batch.value
            state.stop_training()  # the saver, next on this event, checkpoints a run at its end
            state.evaluators = []  # and no evaluation at the end of this shortened run

    def release(self) -> None:
        """(after fit, also one that raised) SIGTERM means again what it meant before."""
        self._left.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
