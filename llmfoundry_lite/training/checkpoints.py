"""Checkpoints that survive crashes, bad bytes and planted files: resume only from complete, intact
ones, say which, and let no checkpoint run code; check the disk first.

Composer writes a checkpoint (one `.pt`, or with `state_dict_type: sharded` a DCP folder with a file
per rank), waits for every rank, then re-points the `latest-rank0.pt` symlink at it. A run killed
while writing leaves a partial checkpoint behind; one killed between unlinking and re-creating the
symlink leaves no symlink. Left alone, the relaunch would start from scratch (no symlink) or refuse
to start (a partial `.pt` "conflicts with a future checkpoint"). So before the Trainer is built,
`prepare_autoresume` (every rank) picks the checkpoint to resume from:
- global rank 0 checks every checkpoint in `save_folder` for completeness: a DCP folder is complete
  once its `.metadata` exists (DCP writes it last, atomically, after every rank's data), a `.pt` once
  its zip central directory (`torch.save` writes it last) can be read; incomplete ones are moved to
  `save_folder/incomplete/` (kept for inspection, never deleted);
- newest first, every rank re-hashes its share of a checkpoint's files against the manifest written
  when it was saved (`ChecksumManifests`, export/checksums.py); one that differs is moved to
  `save_folder/corrupt/` and the previous one is tried;
- the symlink is pointed at the chosen checkpoint, which is logged as the resume point.
Composer then loads it (or `load_path`) through `gate_composer_loading`: nothing it unpickles can run code.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from typing import Callable, List, Optional

from composer.core import Callback
from composer.utils import dist

from llmfoundry_lite.errors import CheckpointError, UserError
from llmfoundry_lite.export import checksums, safe_load
from llmfoundry_lite.export.composer_checkpoint import LATEST

log = logging.getLogger(__name__)
INCOMPLETE = "incomplete"
CORRUPT = "corrupt"
_BATCH = re.compile(r"ba(\d+)")


def gate_composer_loading() -> None:
    """Make Composer pass every checkpoint file through export/safe_load.py right before it opens it
    (its `CHECKPOINT_VALIDATION_FUNCTION` hook); a validator the user set is still called, after ours."""
    ours = f"{safe_load.__name__}.{safe_load.validate_for_composer.__name__}"
    theirs = os.environ.get(safe_load.COMPOSER_HOOK)
    if theirs and theirs != ours:
        os.environ[safe_load.NEXT_VALIDATOR] = theirs
    os.environ[safe_load.COMPOSER_HOOK] = ours


def batch_of(name: str) -> int:
    """The batch number in a checkpoint's name (`ep0-ba12-rank0.pt`, `ep0-ba12`: 12); -1 without one."""
    m = _BATCH.search(name)
    return int(m.group(1)) if m else -1


def is_complete(path: str) -> bool:
    """Whether a checkpoint file or sharded folder was written to the end."""
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, ".metadata"))
    if path.endswith(".pt"):
        try:
            with zipfile.ZipFile(path) as zf:
                return bool(zf.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return os.path.getsize(path) > 0  # compressed/tar checkpoints: no cheap check beyond existence


def _checkpoints(folder: str) -> List[str]:
    """The names of the checkpoints in `folder`, oldest first: `.pt` files and DCP folders."""
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if (batch_of(name) < 0 or os.path.islink(path)  # also skips INCOMPLETE and CORRUPT (no batch number)
                or os.path.isdir(path) and not any(n.endswith(".distcp") or n == ".metadata" for n in os.listdir(path))
                or os.path.isfile(path) and (".pt" not in name or name.endswith(checksums.SUFFIX))):
            continue
        found.append(name)
    return sorted(found, key=lambda name: (batch_of(name), name))


def _set_aside(folder: str, name: str, kind: str) -> str:
    """Move a checkpoint (and its manifest) to `folder/kind/`; never deleted."""
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
    target = os.path.join(folder, kind, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(os.path.join(folder, name), target)
    if os.path.isfile(os.path.join(folder, name + checksums.SUFFIX)):
        os.replace(os.path.join(folder, name + checksums.SUFFIX), target + checksums.SUFFIX)
    return target


def _complete_checkpoints(folder: str) -> List[str]:
    """Set aside the incomplete checkpoints of `folder`; the paths of the others, newest first."""
    complete = []
    for name in _checkpoints(folder):
        path = os.path.join(folder, name)
        if is_complete(path):
            complete.append(path)
            continue
        target = _set_aside(folder, name, INCOMPLETE)
        log.warning("checkpoint %s was not written to the end (the run stopped while saving it); "
                    "moved it to %s and will not resume from it", path, target)
    return complete[::-1]


def _point_latest(folder: str, path: Optional[str]) -> None:
    link = os.path.join(folder, LATEST)
    if path is None:
        if os.path.islink(link):
            os.unlink(link)
        return
    name = os.path.basename(path)
    if not os.path.islink(link) or os.readlink(link) != name:
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(name, tmp)
        os.replace(tmp, link)  # atomic: a crash here leaves the old symlink or the new one


def corruption(path: str) -> List[str]:
    """(every rank) What differs in `path` from its checksum manifest, each rank re-hashing its share."""
    problems, unverified = checksums.verify(path, dist.get_global_rank(), dist.get_world_size())
    if unverified:
        log.warning("checkpoint %s: no checksum was recorded for %s (written elsewhere, or the run stopped "
                    "right after saving it): their bytes cannot be verified", path, ", ".join(unverified))
    return [p for rank_problems in dist.all_gather_object(problems) for p in rank_problems]


def resume_candidate(folder: str) -> Optional[str]:
    """The checkpoint autoresume would start from in a local `folder` (what its latest symlink names, else
    the newest), read only: for checks made before the run starts."""
    link = os.path.join(folder, LATEST)
    if os.path.exists(link):
        return os.path.realpath(link)
    found = _checkpoints(folder) if os.path.isdir(folder) else []
    return os.path.join(folder, found[-1]) if found else None


def prepare_autoresume(folder: str, listing: Optional[Callable[[], List[str]]] = None,
                       fetch: Optional[Callable[[str], object]] = None) -> Optional[str]:
    """(every rank) Set aside the incomplete and corrupt checkpoints in `folder`, point the latest symlink
    at the newest good one and return its path (None when there is none: the run starts from scratch).
    For a save_folder in an object store (store_checkpoints.py), `listing` gives the names to try, newest
    first, and `fetch(name)` (local rank 0 of each node) downloads one into `folder`, the staging folder."""
    rank0 = dist.get_global_rank() == 0
    if listing is None:
        found = _complete_checkpoints(folder) if rank0 and os.path.isdir(folder) else []
    else:
        found = [os.path.join(folder, name) for name in listing()] if rank0 else []
    candidates = [found]
    dist.broadcast_object_list(candidates, src=0)
    chosen = None
    for path in candidates[0]:
        if fetch is not None:
            if dist.get_local_rank() == 0:
                fetch(os.path.basename(path))
            dist.barrier()
            if not is_complete(path):
                log.warning("checkpoint %s is not complete in the object store; trying the previous one", path)
                continue
        problems = corruption(path)
        if not problems:
            chosen = path
            break
        if rank0:
            target = _set_aside(folder, os.path.basename(path), CORRUPT)
            log.warning("checkpoint %s is corrupt (%s); moved it to %s and will not resume from it (the "
                        "previous complete checkpoint is tried next)", path, "; ".join(problems), target)
    if (dist.get_local_rank() == 0 if fetch is not None else rank0) and os.path.isdir(folder):
        _point_latest(folder, chosen)  # in a store's staging folder: on every node
    dist.barrier()
    return chosen


class ChecksumManifests(Callback):
    """After each checkpoint Composer's saver writes, every rank records the checksums of the files it
    wrote (export/checksums.py), rank 0 with the run's `layout`. It must run after the saver on the same event."""

    def __init__(self, saver, layout: dict):
        self.saver, self.layout, self.last = saver, layout, None

    def _record(self) -> None:
        saved = self.saver.saved_checkpoints[-1] if self.saver.saved_checkpoints else None
        if saved is None or saved == self.last:
            return
        self.last = saved
        sharded = os.path.basename(saved).endswith(".distcp")
        rank = dist.get_global_rank()
        checksums.write_manifest(os.path.dirname(saved) if sharded else saved, rank, self.layout if rank == 0 else None)
        if not sharded:  # the saver deletes rotated-out `.pt` files, not the manifests beside them
            folder = os.path.dirname(saved)
            for name in os.listdir(folder):
                if name.endswith(checksums.SUFFIX) and not os.path.exists(os.path.join(folder, name[:-len(checksums.SUFFIX)])):
                    os.remove(os.path.join(folder, name))

    def batch_checkpoint(self, state, logger) -> None:
        self._record()

    def epoch_checkpoint(self, state, logger) -> None:
        self._record()

    def iteration_checkpoint(self, state, logger) -> None:
        self._record()


def check_save_folder(folder: str, checkpoint_bytes: int) -> None:
    """Fail before training when `folder` cannot be written or cannot hold one more checkpoint."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder) as f:
            f.write(b"ok")
    except OSError as e:
        raise UserError(f"save_folder {folder} is not writable ({e.strerror or e}); choose another save_folder "
                        "or fix its permissions") from None
    free = shutil.disk_usage(folder).free
    if free < checkpoint_bytes:
        raise UserError(f"save_folder {folder} has {free / 2**20:,.0f} MiB free, but one checkpoint needs about "
                        f"{checkpoint_bytes / 2**20:,.0f} MiB; free some space, choose another save_folder, or set "
                        "save_weights_only: true")


# What torch.save says when a write to its zip archive fell short (it hides the OSError).
_SHORT_WRITE = ("unexpected pos", "PytorchStreamWriter failed writing file")


def checkpoint_write_error(e: BaseException, folder: Optional[str]) -> Optional[UserError]:
    """A UserError for a checkpoint that could not be written because the disk is full, from the OSError
    (a sharded save: wrapped by DCP), or torch.save's RuntimeError; None for other errors."""
    causes = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()] or [e]
    full = any(isinstance(c, OSError) and c.errno in (errno.ENOSPC, errno.EDQUOT) for c in causes)
    if not full and isinstance(e, RuntimeError) and any(s in str(e) for s in _SHORT_WRITE) and folder:
        full = os.path.isdir(folder) and shutil.disk_usage(folder).free < 2**20
    if not full:
        return None
    return CheckpointError(f"disk full: the disk of save_folder {folder} filled up while writing a checkpoint. "
                           "The partial checkpoint is set aside on the next launch; free some space and relaunch "
                           "the same command to resume from the last complete checkpoint")
