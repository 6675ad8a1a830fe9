"""Faults for the reliability tests, as a callback a test YAML names: `callbacks: {fault_injection: {}}`.

The fault comes from the environment, so a relaunch can be the very same command with another (or no)
fault: `LLMF_FAULT="<kind>:<rank>:<batch>"` kills rank `<rank>` with SIGKILL
- `mid_step`: after the backward pass of batch `<batch>` (1-based), before the optimizer step;
- `checkpoint_write`: while the checkpoint at batch `<batch>` is written, after this rank wrote its
  own shard file (sharded) or half of the file (full `.pt`), before the checkpoint is complete;
- `between`: at the end of batch `<batch>` (Composer checkpoints a batch after its end event, so
  this is after the previous checkpoint and before this batch's);
- `before_pointer`: (save_folder in an object store) after the checkpoint at batch `<batch>` and its
  manifest were uploaded, right before its latest-checkpoint pointer object is written;
- `node`: like `mid_step`, but SIGKILLs the rank's whole process group: on a node started in its own
  session, the `composer` launcher and every rank of that node die together, as when a machine fails.
- `stall`: sends itself SIGSTOP at the end of batch `<batch>` (a rank that stops answering);
- `sigterm`: sends itself SIGTERM at the end of batch `<batch>` (a preemption notice to that rank).
`nan_grads:<rank>:<b1,b2,...>` instead poisons the gradients of those batches (NaN) on that rank.
A fault happens once: not in the workers `torchrun --max-restarts` starts again after it.
"""
import os
import signal

from composer.core import Callback
from composer.utils import dist

from llmfoundry_lite import registry


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


class FaultInjection(Callback):
    def __init__(self):
        kind, rank, batches = (os.environ.get("LLMF_FAULT") or "none:-1:0").split(":")
        self.kind, self.batches = kind, {int(b) for b in batches.split(",")}
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.armed = dist.get_global_rank() == int(rank) and first_attempt

    def _now(self, state) -> int:
        return state.timestamp.batch.value + 1  # the batch being trained, 1-based

    def fit_start(self, state, logger):
        if self.armed and self.kind == "checkpoint_write":
            self._arm_checkpoint_write(state)
        if self.armed and self.kind == "before_pointer":
            self._arm_before_pointer(state)

    def after_backward(self, state, logger):
        if not self.armed:
            return
        if self.kind == "mid_step" and self._now(state) in self.batches:
            _die()
        if self.kind == "node" and self._now(state) in self.batches:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        if self.kind == "nan_grads" and self._now(state) in self.batches:
            for p in state.model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
                    break

    def batch_end(self, state, logger):
        if not self.armed or state.timestamp.batch.value not in self.batches:
            return
        if self.kind == "between":
            _die()
        if self.kind in ("stall", "sigterm"):
            os.kill(os.getpid(), signal.SIGSTOP if self.kind == "stall" else signal.SIGTERM)

    def _arm_checkpoint_write(self, state):
        import torch.distributed.checkpoint as dcp
        from composer.utils import checkpoint
        batches = self.batches

        original_write = dcp.FileSystemWriter.write_data

        def write_then_die(writer, plan, planner):  # sharded: this rank's .distcp is on disk, no .metadata yet
            result = original_write(writer, plan, planner)
            if state.timestamp.batch.value in batches:
                result.wait()
                _die()
            return result

        def half_then_die(state_dict, filename):  # full: half a .pt file
            if state.timestamp.batch.value not in batches:
                return original_file(state_dict, filename)
            original_file(state_dict, filename)
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            _die()

        original_file = checkpoint._write_checkpoint_file
        dcp.FileSystemWriter.write_data = write_then_die
        checkpoint._write_checkpoint_file = half_then_die


    def _arm_before_pointer(self, state):
        from llmfoundry_lite import stores
        from llmfoundry_lite.export.composer_checkpoint import POINTER
        original, batches = stores.write_text, self.batches

        def die_before_pointer(uri, text):
            if uri.endswith("/" + POINTER) and state.timestamp.batch.value in batches:
                _die()
            return original(uri, text)

        stores.write_text = die_before_pointer


registry.callbacks.register("fault_injection", FaultInjection)
