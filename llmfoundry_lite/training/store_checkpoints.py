"""Checkpoints in an object store (`save_folder: s3://bucket/{run_name}`), in an order that never
leaves a resume point naming a half-uploaded checkpoint.

Composer writes every checkpoint into a local staging folder (the cache's `staging/` mirror of the
URI); this project uploads it itself instead of Composer's background upload workers, whose order
is not known:
1. every rank uploads the files it wrote (its shards and checksum manifest; a full `.pt`: rank 0);
2. after a barrier, rank 0 uploads what makes the checkpoint complete (a sharded one's `.metadata`),
   records it in the prefix's manifest object (what the run wrote: all it may ever delete there),
3. then writes the pointer object (Composer's `latest-rank0.pt.symlink`) naming it, last;
4. then deletes the oldest checkpoints beyond `save_num_checkpoints_to_keep` from the bucket.
A run killed anywhere in 1-3 leaves the pointer on the previous checkpoint. On relaunch the staging
folder is emptied (it is only a cache of the bucket) and `prepare_autoresume` downloads the pointer's
checkpoint, checks it like a local one (complete, checksums) and falls back to older ones; a prefix
holding objects the run did not write is refused unless `save_overwrite`.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import List

from composer.core import Callback
from composer.utils import dist

from llmfoundry_lite import stores
from llmfoundry_lite.export import checksums
from llmfoundry_lite.export.composer_checkpoint import POINTER, pointed_name
from llmfoundry_lite.training.checkpoints import batch_of

log = logging.getLogger(__name__)
WRITER = "train"


def claim_prefix(uri: str, overwrite: bool) -> None:
    """(global rank 0, before training) A prefix holding objects that no training run of ours wrote is
    refused unless `save_overwrite` (stores.claim_prefix); then, or when new, it gets our manifest."""
    stores.claim_prefix(uri, WRITER, "save_folder", overwrite, overwrite_flag="save_overwrite: true",
                        overwrite_does="its checkpoints replace objects of the same names")
    if stores.prefix_manifest(uri) is None or stores.prefix_manifest(uri)["writer"] != WRITER:
        stores.write_prefix_manifest(uri, WRITER, ())


def _recorded(uri: str) -> List[str]:
    """The checkpoints the prefix's manifest records (those runs of ours uploaded there)."""
    return (stores.prefix_manifest(uri) or {"files": []})["files"]


def candidates(uri: str) -> List[str]:
    """The checkpoints to try resuming from, newest first: the pointer's, then older recorded ones."""
    pointed = pointed_name(uri)
    if pointed is None:
        return []
    recorded = _recorded(uri)
    newer = [n for n in recorded if batch_of(n) > batch_of(pointed)]
    if newer:
        log.warning("checkpoints %s in %s are newer than its pointer (the run stopped while uploading them): "
                    "not resumed from", ", ".join(newer), uri)
    older = sorted((n for n in recorded if batch_of(n) < batch_of(pointed)), key=batch_of, reverse=True)
    return [pointed, *older]


def fetch(uri: str, name: str, staging: str) -> str:
    """(local rank 0) Download checkpoint `name` (a DCP prefix, or a `.pt` with its manifest) into staging."""
    remote = stores.join(uri, name)
    if stores.exists(remote):
        stores.download(remote, os.path.join(staging, name))
        if stores.exists(remote + checksums.SUFFIX):
            stores.download(remote + checksums.SUFFIX, os.path.join(staging, name + checksums.SUFFIX))
    else:
        stores.download_folder(remote, os.path.join(staging, name))
    return os.path.join(staging, name)


def fresh_staging(uri: str) -> str:
    """(every rank) The local folder Composer saves into for `uri`, emptied on each node: the bucket is the truth."""
    staging = stores.local_mirror(uri, "staging")
    if dist.get_local_rank() == 0:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    dist.barrier()
    return staging


class UploadCheckpoints(Callback):
    """After each checkpoint Composer's saver writes (and after ChecksumManifests), upload it in order,
    then remove the previous one from the staging folder. Composer keeps every local checkpoint
    (`save_num_checkpoints_to_keep: -1`): this callback rotates the staging folder and the bucket."""

    def __init__(self, saver, uri: str, keep: int):
        self.saver, self.uri, self.keep = saver, uri, keep
        self.batch, self.previous = None, None

    def _upload(self, state) -> None:
        # Every rank decides alike (a full checkpoint is saved by rank 0 only, but all ranks meet below).
        if self.saver.last_checkpoint_batch is None or self.saver.last_checkpoint_batch == self.batch:
            return
        self.batch, rank = self.saver.last_checkpoint_batch, dist.get_global_rank()
        sharded = state.fsdp_sharded_state_dict_enabled
        saved = self.saver.saved_checkpoints[-1] if self.saver.saved_checkpoints else None
        local = os.path.dirname(saved) if sharded and saved else saved
        if sharded:  # each rank its own shard files and manifest (on several nodes only it has them)
            own = [n for n in os.listdir(local) if n.startswith(f"__{rank}_") or n == f".checksums.rank{rank}.json"]
            stores.upload_folder(local, stores.join(self.uri, os.path.basename(local)), only=own)
        dist.barrier()
        if rank == 0:
            name = os.path.basename(local)
            if sharded:
                stores.upload(os.path.join(local, ".metadata"), stores.join(self.uri, name, ".metadata"))
            else:
                stores.upload(local + checksums.SUFFIX, stores.join(self.uri, name + checksums.SUFFIX))
                stores.upload(local, stores.join(self.uri, name))
            recorded = sorted({*_recorded(self.uri), name}, key=batch_of)
            stores.write_prefix_manifest(self.uri, WRITER, recorded)
            stores.write_text(stores.join(self.uri, POINTER), stores.split(stores.join(self.uri, name))[2])
            log.info("uploaded checkpoint %s to %s", name, self.uri)
            self._rotate(recorded, name)
        dist.barrier()
        if self.previous and dist.get_local_rank() == 0:  # uploaded: the staging copy is no longer needed
            if sharded:
                shutil.rmtree(self.previous, ignore_errors=True)
            else:
                _remove(self.previous)
        self.previous = local

    def _rotate(self, recorded: List[str], newest: str) -> None:
        """Delete the oldest checkpoints this run's prefix recorded beyond `keep` (never the newest)."""
        if self.keep <= 0:
            return
        old = [n for n in recorded[:-self.keep] if n != newest]
        for name in old:
            remote = stores.join(self.uri, name)
            if stores.exists(remote):  # a `.pt` and its manifest
                doomed = [remote, remote + checksums.SUFFIX]
            else:  # a sharded checkpoint's prefix
                doomed = [stores.join(remote, n) for n in stores.names(remote)]
            for uri in doomed:
                stores.delete(uri)
        if old:
            stores.write_prefix_manifest(self.uri, WRITER, [n for n in recorded if n not in old])

    def batch_checkpoint(self, state, logger) -> None:
        self._upload(state)

    def epoch_checkpoint(self, state, logger) -> None:
        self._upload(state)

    def iteration_checkpoint(self, state, logger) -> None:
        self._upload(state)


def _remove(checkpoint: str) -> None:
    for path in (checkpoint, checkpoint + checksums.SUFFIX):
        if os.path.exists(path):
            os.remove(path)
