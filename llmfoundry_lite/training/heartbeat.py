"""A heartbeat between the ranks: a rank that stops answering ends the job in seconds, named.

A rank that is stopped (SIGSTOP, a frozen node, a GIL held forever) leaves the others waiting in
their next collective until `dist_timeout` (600 s by default), and a value short enough to catch a
stall would also kill healthy runs while rank 0 works alone (integrity checks, uploads). So each rank
runs a thread, beside training, that after each batch and at least every `interval` seconds bumps its
own beat (with the last batch it completed) in the job's rendezvous store and reads everyone's. Threads beat while their
rank waits in a collective or saves, so only a rank that truly stopped goes quiet. When one rank's
beat has not moved for `heartbeat_timeout` seconds by the watcher's own clock (no clock is compared
across machines), the watcher logs which rank, for how long and its last completed batch, and ends its
own process with exit code 3: every healthy rank does the same, and the launcher ends the job.

The store is the one `MASTER_ADDR:MASTER_PORT` names (hosted by rank 0 under `composer`, by the agent
under `torchrun`), reached over a client of its own whose operations time out after
`heartbeat_timeout`: if its host is the stalled one, the store stops answering and that is reported.
"""
from __future__ import annotations

import datetime
import logging
import os
import sys
import threading
import time
from typing import Dict, Optional

import torch
from composer.core import Callback
from composer.utils import dist

log = logging.getLogger(__name__)
EXIT_CODE = 3
DONE = "done"
_fits = 0  # fits started in this process: each gets its own keys (the tests run several per process)


class Heartbeat(Callback):
    """`timeout` None: off. `stop()` ends it after fit (entry.py), also after a fit that raised."""

    def __init__(self, timeout: Optional[float]):
        self.timeout, self.interval = timeout, max(0.5, min(5.0, (timeout or 0) / 10))
        self.batch = 0
        self._done, self._batch_ended = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    def fit_start(self, state, logger) -> None:
        global _fits
        _fits += 1
        world = dist.get_world_size()
        if not self.timeout or world == 1 or "MASTER_ADDR" not in os.environ:
            return
        self.batch = state.timestamp.batch.value
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun keeps its store across restarts
        prefix = f"llmfoundry_lite/heartbeat/{attempt}/{_fits}"
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        store = torch.distributed.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=self.timeout))
        rank = dist.get_global_rank()
        store.set(f"{prefix}/{rank}", self._beat(0))
        keys = [f"{prefix}/{r}" for r in range(world)]
        dist.barrier()  # every rank's key exists before anyone reads them all
        self._thread = threading.Thread(target=self._watch, args=(store, keys, rank, f"{host}:{port}"),
                                        name="heartbeat", daemon=True)
        self._thread.start()

    def batch_end(self, state, logger) -> None:
        self.batch = state.timestamp.batch.value
        self._batch_ended.set()

    def stop(self) -> None:
        """(after fit, also one that raised) Beat `done` and stop: the others no longer wait for this rank."""
        self._done.set()
        self._batch_ended.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout)
            self._thread = None

    def _beat(self, count) -> str:
        return f"{count} {self.batch}"

    def _watch(self, store, keys, rank: int, where: str) -> None:
        last: Dict[int, tuple] = {}  # rank -> (beat seen, when it changed, by this rank's clock)
        count = 0
        while True:
            self._batch_ended.wait(self.interval)
            self._batch_ended.clear()
            if self._done.is_set():
                try:
                    store.set(keys[rank], self._beat(DONE))
                except Exception:  # noqa: BLE001 (the job is ending; a store gone by now changes nothing)
                    pass
                return
            count += 1
            started = time.monotonic()
            try:
                store.set(keys[rank], self._beat(count))
                beats = [v.decode().split() for v in store.multi_get(keys)]
            except Exception as e:  # noqa: BLE001 (any failure of the store's connection means the same)
                if self._done.is_set():
                    return
                self._stop(f"the job's rendezvous store at {where} (hosted by rank 0 under `composer`, by the "
                           f"launcher under `torchrun`) stopped answering ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else 'no reply'}, after "
                           f"{time.monotonic() - started:.0f} s): rank 0 or its node stalled or is gone", rank)
                return
            now = time.monotonic()
            for other, (beat, batch) in enumerate(beats):
                if beat == DONE:  # past its training loop: it may rightly wait, or have left
                    continue
                seen = last.get(other)
                if seen is None or seen[0] != beat:
                    last[other] = (beat, now, batch)
                elif now - seen[1] > self.timeout:
                    self._stop(f"rank {other} stopped answering: no heartbeat for {now - seen[1]:.0f} s "
                               f"(heartbeat_timeout {self.timeout:g} s); its last completed batch is {batch} (or the one after: "
                               "it stopped before its next beat)", rank)
                    return

    def _stop(self, why: str, rank: int) -> None:
        message = (f"rank {rank} stops (this rank completed batch {self.batch}): {why}. The job ends now instead of "
                   "waiting for dist_timeout; look at that rank's log and node, then relaunch the same command: "
                   "autoresume continues from the last complete checkpoint")
        log.error(message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(EXIT_CODE)  # the main thread is blocked in a collective: only leaving the process ends it
