"""MDS shards (mosaicml-streaming): column layouts, writing, and the streaming pitfalls handled for users.

Token columns. llm-foundry writes fixed-length chunks as a `tokens` column of raw `bytes` holding
int32 ids (older versions int64: `token_encoding_type`). We write `ndarray:uint16` when the vocab
fits in 16 bits (half the disk and IO) and `ndarray:int32` otherwise: the dtype is recorded in the
shard's column encoding, so the reader never guesses. `decode_tokens` reads all three.

Publishing. A split is written into a hidden `.<name>.partial` folder beside the target and moved
into place only when the whole conversion succeeded (`publish_split`): a failed run leaves nothing,
and a killed one leaves only the partial folder, which names the run. The split's own path must not
be a symbolic link: the rename would replace the link (or fail on it), never fill what it points to,
so such a path is refused before any work and the link's target is never touched; links further up
(an `--out_root` that links to a folder on another disk) are followed, as the rename happens inside
their target (`check_output_links`). A loader pointed at a folder without `index.json` says why
(`check_local_split`): the interrupted run, a text conversion still to resume, shards without an
index, or no data at all.

Shared memory. StreamingDataset coordinates ranks and workers through /dev/shm segments named
`NNNNNN_<name>` and lock files in /tmp. A hard-killed run leaves them behind; streaming's own
`clean_stale_shared_memory()` unlinks every such segment, including those of a run that is still
alive. `clean_stale_shared_memory` here only removes segments no live process has mapped.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterator

import numpy as np
from streaming import StreamingDataset
from streaming.base.hashing import get_hash

from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.files import check_folder_path, remove_entries

TOKEN_DTYPES = ("uint16", "int32", "int64")
SHARD_HASHES = ["xxh64"]  # recorded in index.json by data prep; a loader with `validate_hash: xxh64` checks them
_SHM_NAME = re.compile(r"^\d{6}_[a-z_]+$")


def token_column_encoding(vocab_size: int) -> str:
    """The MDS encoding for token ids of a vocab of this size."""
    return "ndarray:uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "ndarray:int32"


def decode_tokens(value: Any, bytes_dtype: str = "int32") -> np.ndarray:
    """Token ids from an MDS `tokens` value: an ndarray (dtype in the column) or llm-foundry raw bytes."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) % np.dtype(bytes_dtype).itemsize:
            raise DataError(f"a `tokens` bytes sample of {len(value)} bytes is not a whole number of "
                            f"{bytes_dtype} ids; set the dataset's token_encoding_type to the dtype the shards were written with")
        return np.frombuffer(value, dtype=bytes_dtype)
    raise DataError(f"unexpected `tokens` value of type {type(value).__name__}; expected bytes or an ndarray")


def check_output_links(path: str, flag: str, link_ok: bool = False) -> None:
    """Refuse, naming the link and its target, an output path whose folders lead through a symbolic link to
    nothing (dangling) or to a file, or that is itself a link (any link, unless `link_ok`: a command that
    writes into the folder, rather than renaming one onto its path, may follow a link to a folder)."""
    full = pathlib.Path(os.path.abspath(path))
    for current in (full, *full.parents):
        if not current.is_symlink():
            continue
        target = os.readlink(current)
        kind = "the folder" if current.is_dir() else "the file" if current.exists() else None
        where = "" if current == full else f" (in {path})"
        if current == full and not link_ok:
            what = f"to {kind} {target}" if kind else f"to {target}, which does not exist"
            raise UserError(f"{flag}: {current} is a symbolic link {what}; data prep publishes a split by renaming "
                            "a new folder to that path, which would replace the link, not write into what it points "
                            f"to. Nothing was written. Remove the link (what it points to is kept) or choose another "
                            f"{flag}")
        if kind is None:
            raise UserError(f"{flag}: {current}{where} is a symbolic link to {target}, which does not exist; "
                            f"nothing was written. Create that folder, remove the link, or choose another {flag}")
        if kind == "the file":
            raise UserError(f"{flag}: {current}{where} is a symbolic link to the file {target}, not a folder; "
                            f"nothing was written. Choose a folder path for {flag}")


def check_output_folder(out_dir: str, flag: str = "--out_root") -> None:
    """An output folder must be new or empty: shards would be mixed with old ones; a file is no folder, and
    a symbolic link is no folder to publish a split at (`check_output_links`)."""
    check_output_links(out_dir, flag)
    check_folder_path(out_dir, flag)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UserError(f"output folder {out_dir} is not empty; remove it or choose another {flag}")


def _partial_folder(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


@contextlib.contextmanager
def publish_split(out_dir: str, flag: str = "--out_root") -> Iterator[str]:
    """Yield a temporary folder to write a split into; it becomes `out_dir` only if the block succeeds.

    A failure removes it; a hard kill leaves it beside `out_dir`, with `<folder>.json` naming the
    command, which `check_local_split` reports and the next run of the command replaces."""
    check_output_folder(out_dir, flag)
    tmp = _partial_folder(out_dir)
    parent, name = os.path.split(tmp)
    if os.path.lexists(tmp) or os.path.lexists(tmp + ".json"):
        print(f"removing {tmp}, left by an interrupted run")
        remove_entries(parent, [name, name + ".json"])  # a link there is removed, never what it points to
    os.makedirs(tmp)
    with open(tmp + ".json", "x") as f:  # beside the folder: MDSWriter wants an empty one
        json.dump({"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
    try:
        yield tmp
        check_output_folder(out_dir, flag)  # again: something may have appeared there during the run
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty and no link (checked just now)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.remove(tmp + ".json")


def check_local_split(folder: str) -> None:
    """A local split streaming can open (it holds index.json), else a DataError saying why not."""
    if os.path.isfile(os.path.join(folder, "index.json")):
        return
    partial = _partial_folder(folder)
    if os.path.isdir(partial):
        try:
            with open(partial + ".json") as f:
                run = json.load(f)
        except (OSError, ValueError):
            run = {}
        raise DataError(f"{folder} was never finished: the data-prep run writing it (`{run.get('command', '?')}`, "
                        f"started {run.get('started', '?')}) was interrupted and left {partial}. "
                        "Run that command again; it starts the split over")
    if not os.path.exists(folder):
        raise DataError(f"data folder {folder} does not exist; point `local` (and `split`) at a folder written by "
                        "`llmfoundry-lite data-prep`, or give a `remote` to download from")
    if not os.path.isdir(folder):
        raise DataError(f"{folder} is a file; `local`/`split` must name a folder written by `llmfoundry-lite data-prep`")
    if os.path.isfile(os.path.join(folder, "plan.json")):
        raise DataError(f"{folder} holds an unfinished `data-prep text` conversion (no index.json yet); run the same "
                        "command again to resume it")
    if glob.glob(os.path.join(folder, "piece-*-of-*")):
        raise DataError(f"{folder} holds pieces of a split (--num_shards) that were never merged: run "
                        f"`llmfoundry-lite data-prep merge` on it once every piece is written")
    if glob.glob(os.path.join(folder, "**", "*.mds*"), recursive=True):
        raise DataError(f"{folder} has MDS shards but no index.json: the run that wrote them did not finish (or the "
                        "index was deleted); write the split again with `llmfoundry-lite data-prep`")
    raise DataError(f"{folder} has no index.json: it is not a split written by `llmfoundry-lite data-prep`; "
                    "check `local` and `split`")


def clean_stale_shared_memory() -> int:
    """Unlink streaming's /dev/shm segments (and their /tmp locks) that no live process maps, so it is safe
    while other runs are alive; returns how many segments were removed."""
    if not os.path.isdir("/dev/shm") or not os.path.isdir("/proc/self"):  # /proc tells which segments are mapped
        return 0
    mapped = set()
    for maps in glob.glob("/proc/[0-9]*/maps"):
        try:
            with open(maps) as f:
                mapped.update(line.split("/dev/shm/", 1)[1].split()[0] for line in f if "/dev/shm/" in line)
        except OSError:  # process exited, or not ours to read: its segments count as unknown-live
            continue
    removed = []
    for name in os.listdir("/dev/shm"):
        if _SHM_NAME.match(name) and name not in mapped:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))
                removed.append(name)
    live_prefixes = {n[:6] for n in os.listdir("/dev/shm") if _SHM_NAME.match(n)}
    for prefix in {n[:6] for n in removed} - live_prefixes:
        for lock in glob.glob(os.path.join(tempfile.gettempdir(), f"{prefix}_*filelock")):
            with contextlib.suppress(OSError):
                os.unlink(lock)
    return len(removed)


def streaming_init(dataset, **kwargs: Dict[str, Any]) -> None:
    """Call `StreamingDataset.__init__` on `dataset`, turning streaming's errors into UserErrors."""
    clean_stale_shared_memory()
    sources = kwargs.get("streams") or [kwargs]
    for src in sources:  # local-only data must be complete here: streaming would fail later, less clearly
        get = src.get if isinstance(src, dict) else lambda key, s=src: getattr(s, key, None)
        if get("remote") is None and get("local") is not None:
            check_local_split(os.path.join(get("local"), get("split") or ""))
    try:
        StreamingDataset.__init__(dataset, **kwargs)
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise UserError(
                f"the local folder of this dataset is in use by another dataset of this run or by another "
                f"live run ({str(e).splitlines()[0]}). Give every dataset and every concurrent run its own "
                "`local` folder.") from None
        raise UserError(f"cannot open the streaming dataset: {e}") from None
    except FileNotFoundError as e:
        raise DataError(f"MDS index not found: {e.filename or e}. Point `local`/`remote`/`split` at a folder "
                        "written by `llmfoundry-lite data-prep` (it holds index.json)") from None
    except RuntimeError as e:
        if "contains no samples" in str(e):
            raise DataError(f"{e} The split is empty; check `split` and the data-prep summary.") from None
        raise
    check_local_shards(dataset)


def check_local_shards(dataset) -> None:
    """Refuse shard files already in `local` whose size (always) or hash (with `validate_hash`) differs
    from their index entry. streaming checks hashes only of what it downloads or decompresses, so a
    truncated or corrupted local shard would otherwise be read as garbage or fail mid-epoch. The size
    check is a `stat` per shard; the hash check reads every local shard once (local rank 0 only)."""
    hash_here = os.environ.get("LOCAL_RANK", "0") == "0"
    for shard, stream_id in zip(dataset.shards, dataset.stream_per_shard, strict=True):
        stream = dataset.streams[stream_id]
        algo = stream.validate_hash
        for pair in shard.file_pairs:  # (raw, compressed): one of them must be here, or downloadable
            files = [(os.path.join(shard.dirname, shard.split or "", i.basename), i) for i in pair if i is not None]
            here = [(path, info) for path, info in files if os.path.isfile(path)]
            if stream.remote is None and not here:
                raise DataError(f"MDS shard {files[-1][0]} is listed in its index.json but missing, and there is "
                                "no `remote` to download it from; write the split again with data-prep (or restore the "
                                "file)")
            for path, info in here:  # a file not here is still to be downloaded (and checked)
                size = os.path.getsize(path)
                if size != info.bytes:
                    raise DataError(f"MDS shard {path} has {size} bytes but its index.json says {info.bytes}: it is "
                                    "truncated or was overwritten. Write the split again with data-prep (or delete "
                                    "the file so that it is downloaded again from `remote`)")
                if algo and hash_here:
                    if algo not in info.hashes:
                        raise DataError(f"validate_hash: {algo!r}, but the shards of {shard.dirname} carry "
                                        f"{sorted(info.hashes) or 'no hashes'}; choose one of those or remove "
                                        "validate_hash")
                    with open(path, "rb") as f:
                        if get_hash(algo, f.read()) != info.hashes[algo]:
                            raise DataError(f"MDS shard {path} is corrupted: its {algo} hash differs from "
                                            "index.json. Write the split again with data-prep (or fetch it again "
                                            "from `remote`)")
