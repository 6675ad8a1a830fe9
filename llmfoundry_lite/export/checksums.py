"""Checksum manifests: a checkpoint whose bytes changed after it was written is never loaded.

A zip index or DCP's `.metadata` says a checkpoint was written to the end, not that its tensor bytes
are still those written: a damaged sector, a bad copy or a truncated-then-padded file loads as NaN
or wrong weights. So once Composer has written a checkpoint, each rank records the size and xxh3-128
hash of the files it wrote itself (`write_manifest`, while they are still in the page cache):
- a sharded (DCP) folder gets `.checksums.rank<R>.json` for rank R's `__R_*.distcp` files (and, on
  rank 0, `.metadata`); it travels and is rotated with the folder;
- a full `.pt` file gets `<file>.checksums.json` beside it.
`verify` re-hashes a share of the files (each rank the files rank R wrote, R modulo the world size),
so checking a checkpoint before resuming costs one read of it spread over the ranks. A checkpoint
without a manifest (written elsewhere, or by a run killed between writing it and its manifest) can
only be checked for completeness; `verify` names its files as unverified.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import xxhash

from llmfoundry_lite.errors import CheckpointError
from llmfoundry_lite.files import atomic_write

SUFFIX = ".checksums.json"
_RANK_MANIFEST = re.compile(r"^\.checksums\.rank(\d+)\.json$")
_SHARD_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
_CHUNK = 16 * 2**20


def file_hash(path: str) -> str:
    """xxh3-128 of a file's bytes (about 10 GB/s on one core: the disk is the limit)."""
    h = xxhash.xxh3_128()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _entry(path: str) -> Dict:
    return {"size": os.path.getsize(path), "xxh3_128": file_hash(path)}


def write_manifest(checkpoint: str, rank: int, layout: Optional[Dict] = None) -> str:
    """Record the files `rank` wrote for `checkpoint` (a DCP folder, or a `.pt` file rank 0 wrote), and
    (rank 0) the run's `layout` (world size and global batch: what a relaunch on another world size checks)."""
    if os.path.isdir(checkpoint):
        names = sorted(n for n in os.listdir(checkpoint) if n.startswith(f"__{rank}_") and n.endswith(".distcp"))
        names += [".metadata"] if rank == 0 else []
        files = {name: _entry(os.path.join(checkpoint, name)) for name in names}
        path = os.path.join(checkpoint, f".checksums.rank{rank}.json")
    else:
        files = {os.path.basename(checkpoint): _entry(checkpoint)}
        path = checkpoint + SUFFIX
    record = {"rank": rank, "files": files, **({"layout": layout} if layout else {})}
    with atomic_write(path) as f:
        json.dump(record, f, indent=1)
    return path


def layout(checkpoint: str) -> Dict:
    """The layout rank 0's manifest recorded for `checkpoint` ({} when none did); without one, a DCP
    folder still tells its world size by its `__R_*.distcp` file names."""
    for manifest, _ in _manifests(checkpoint):
        try:
            with open(manifest, encoding="utf-8") as f:
                record = json.load(f)
            if record.get("layout"):
                return dict(record["layout"])
        except (OSError, ValueError, AttributeError):
            continue
    if os.path.isdir(checkpoint):
        writers = {m.group(1) for m in map(_SHARD_FILE.match, os.listdir(checkpoint)) if m}
        return {"world_size": len(writers)} if writers else {}
    return {}


def _manifests(checkpoint: str) -> List[Tuple[str, str]]:
    """(manifest path, folder its file names are relative to) of a checkpoint."""
    if os.path.isdir(checkpoint):
        return [(p, checkpoint) for p in sorted(glob.glob(os.path.join(glob.escape(checkpoint), ".checksums.rank*.json")))
                if _RANK_MANIFEST.match(os.path.basename(p))]
    sidecar = checkpoint + SUFFIX
    return [(sidecar, os.path.dirname(checkpoint))] if os.path.isfile(sidecar) else []


def _checkpoint_files(checkpoint: str) -> List[str]:
    if not os.path.isdir(checkpoint):
        return [os.path.basename(checkpoint)]
    return sorted(n for n in os.listdir(checkpoint) if n.endswith(".distcp") or n == ".metadata")


def verify(checkpoint: str, rank: int = 0, world_size: int = 1) -> Tuple[List[str], List[str]]:
    """(problems, unverified file names) for this rank's share of `checkpoint`: files whose size or hash
    differ from their manifest, or that are missing; rank 0 also reports the files no manifest lists."""
    problems, listed = [], set()
    for manifest, root in _manifests(checkpoint):
        try:
            with open(manifest, encoding="utf-8") as f:
                record = json.load(f)
            writer, files = int(record["rank"]), dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            if rank == 0:
                problems.append(f"{os.path.basename(manifest)} is unreadable ({e})")
            continue
        if not os.path.isdir(checkpoint) and len(files) == 1:  # a `.pt` keeps its manifest when renamed with it
            files = {os.path.basename(checkpoint): next(iter(files.values()))}
        listed.update(files)
        if writer % world_size != rank:
            continue
        for name, expected in files.items():
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                problems.append(f"{name} is missing")
            elif os.path.getsize(path) != expected.get("size"):
                problems.append(f"{name} has {os.path.getsize(path)} bytes, {expected.get('size')} were written")
            elif file_hash(path) != expected.get("xxh3_128"):
                problems.append(f"{name} holds other bytes than were written (xxh3-128 differs)")
    unverified = [n for n in _checkpoint_files(checkpoint) if n not in listed] if rank == 0 else []
    return problems, unverified


def corrupt(checkpoint: str, problems: List[str]) -> CheckpointError:
    return CheckpointError(f"{checkpoint} is corrupt: {'; '.join(problems)}. It changed after it was written "
                           "(a bad disk or copy); use an earlier checkpoint")


def check(checkpoint: str) -> None:
    """In one process: a CheckpointError when `checkpoint` differs from its manifest."""
    problems, _ = verify(checkpoint)
    if problems:
        raise corrupt(checkpoint, problems)
