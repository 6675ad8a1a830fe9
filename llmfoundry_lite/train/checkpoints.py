"""Checkpoints that survive crashes: resume only from complete ones, and say which; check the disk first.

Composer writes a checkpoint (one `.pt`, or with `state_dict_type: sharded` a DCP folder with a file
per rank), waits for every rank, then re-points the `latest-rank0.pt` symlink at it. A run killed
while writing leaves a partial checkpoint behind; one killed between unlinking and re-creating the
symlink leaves no symlink. Left alone, the relaunch would start from scratch (no symlink) or refuse
to start (a partial `.pt` "conflicts with a future checkpoint"). So before the Trainer is built,
`prepare_autoresume` (global rank 0) checks every checkpoint in `save_folder`:
- a DCP folder is complete once its `.metadata` exists (DCP writes it last, atomically, after every
  rank's data), a `.pt` once its zip central directory (`torch.save` writes it last) can be read;
- incomplete ones are moved to `save_folder/incomplete/` (kept for inspection, never deleted);
- the symlink is pointed at the newest complete checkpoint, which is logged as the resume point.
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
from typing import List, Optional, Tuple

from llmfoundry_lite.errors import CheckpointError, UserError
from llmfoundry_lite.export.composer_checkpoint import LATEST

log = logging.getLogger(__name__)
INCOMPLETE = "incomplete"
_BATCH = re.compile(r"ba(\d+)")


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


def _checkpoints(folder: str) -> List[Tuple[int, str]]:
    """(batch, name) of the checkpoints in `folder`, oldest first: `.pt` files and DCP folders."""
    found = []
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        m = _BATCH.search(name)
        if (m is None or os.path.islink(path)  # also skips INCOMPLETE (no batch number)
                or os.path.isdir(path) and not any(n.endswith(".distcp") or n == ".metadata" for n in os.listdir(path))
                or os.path.isfile(path) and ".pt" not in name):
            continue
        found.append((int(m.group(1)), name))
    return sorted(found)


def prepare_autoresume(folder: str) -> Optional[str]:
    """Set aside incomplete checkpoints in `folder`, point the latest symlink at the newest complete
    one and return its path (None when there is none: the run starts from scratch)."""
    if not os.path.isdir(folder):
        return None
    newest = None
    for _, name in _checkpoints(folder):
        path = os.path.join(folder, name)
        if is_complete(path):
            newest = name
            continue
        os.makedirs(os.path.join(folder, INCOMPLETE), exist_ok=True)
        target = os.path.join(folder, INCOMPLETE, f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(path, target)
        log.warning("checkpoint %s was not written to the end (the run stopped while saving it); "
                    "moved it to %s and will not resume from it", path, target)
    link = os.path.join(folder, LATEST)
    if newest is None:
        if os.path.islink(link):
            os.unlink(link)
        return None
    if not os.path.islink(link) or os.readlink(link) != newest:
        tmp = link + ".tmp"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(newest, tmp)
        os.replace(tmp, link)  # atomic: a crash here leaves the old symlink or the new one
    return os.path.join(folder, newest)


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


def disk_full_error(e: OSError, folder: Optional[str]) -> Optional[UserError]:
    """A UserError for a full disk while saving (None for other OS errors)."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    return CheckpointError(f"the disk of save_folder {folder} filled up while writing a checkpoint ({e}). The "
                           "partial checkpoint is set aside on the next launch; free some space and relaunch the "
                           "same command to resume from the last complete checkpoint")
