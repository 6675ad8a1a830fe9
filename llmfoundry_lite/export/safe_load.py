"""The one gate every checkpoint file passes before anything unpickles it: no checkpoint runs code.

A Composer checkpoint holds pickles in three places: a full `.pt` file (torch.save), a sharded (DCP)
folder's `.metadata` (a plain pickle), and the non-tensor entries of its shard files (each a
torch.save: Composer's timestamp, RNG, scheduler and callback states). Composer loads a `.pt` with
`torch.load(weights_only=False)`, and DCP unpickles `.metadata` and those entries unrestricted: any
of them could run code. Here each is read with no power to do so:
- `load_pt`: `torch.load(weights_only=True, mmap=True)`, plus the few plain types Composer pickles;
- `read_metadata`: `.metadata` through an allow-list of DCP's own classes;
- `load_entry`: one DCP entry through `weights_only=True` (DCP's own tensor entries already are).

Our readers (convert, eval, generate, chat, serve, LoRA) call these, and refuse a checkpoint with a
code-running object anywhere in it, also where they would not read (`check_sharded`). Composer's own
loading (autoresume and `load_path` in training) passes `validate_for_composer` first: Composer calls
its `CHECKPOINT_VALIDATION_FUNCTION` hook on every local file right before opening it (the `.pt` it
unpickles, after extracting a compressed one; a DCP `.metadata`; each shard file a rank reads from),
also on the files it has just downloaded from an object store, so no path around it loads a file.
"""
from __future__ import annotations

import datetime
import importlib
import io
import os
import pickle
import zipfile
from typing import IO, Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

from llmfoundry_lite.errors import CheckpointError, refused

# Composer's hook, and where a validator the user had set before ours is kept (ours calls it after).
COMPOSER_HOOK = "CHECKPOINT_VALIDATION_FUNCTION"
NEXT_VALIDATOR = "LLMF_NEXT_CHECKPOINT_VALIDATION_FUNCTION"


def safe_globals() -> list:
    """The non-tensor types a Composer checkpoint pickles (timestamps, versions, numpy RNG state)."""
    multiarray = importlib.import_module("numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray")
    return [datetime.timedelta, torch.torch_version.TorchVersion, np.ndarray, np.dtype, multiarray._reconstruct,
            *(type(np.dtype(t)) for t in ("bool", "int32", "int64", "uint32", "uint64", "float32", "float64"))]


def load_pt(path: str) -> Dict[str, Any]:
    """A `.pt` checkpoint (tensors memory-mapped: read from disk only when used)."""
    if not zipfile.is_zipfile(path):  # every torch.save since 1.6 (and so every Composer checkpoint) is a zip
        raise CheckpointError(f"{path} is not a Composer checkpoint (not a torch.save zip archive: truncated, or "
                              "another kind of file); give a .pt written by `llmfoundry-lite train` (save_folder)")
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise refused(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({str(e).splitlines()[0]}); "
                              "is it truncated, or not a Composer .pt file?") from None


def load_entry(stream: IO[bytes], what: str) -> Any:
    """One non-tensor entry of a DCP shard file."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(stream, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(what, e) from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{what} cannot be read ({str(e).splitlines()[0]}); is the checkpoint truncated "
                              "or incomplete?") from None


# Pure constructors/lookups DCP's .metadata also pickles (storage locations, paths, layouts).
_METADATA_EXTRAS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                    ("pathlib", "WindowsPath"), ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a plain pickle: only DCP's metadata classes and torch sizes/dtypes may appear."""

    def find_class(self, module: str, name: str):
        known = module in ("torch", "pathlib") or module.startswith("torch.")
        obj = getattr(importlib.import_module(module), name, None) if known else None
        dcp_class = isinstance(obj, type) and module == "torch.distributed.checkpoint.metadata"
        torch_value = module == "torch" and (obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout,
                                                                                    torch.memory_format)))
        if not (dcp_class or torch_value or (module, name) in _METADATA_EXTRAS):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")
        return obj


def read_metadata(folder: str):
    """DCP's `.metadata` of a sharded checkpoint folder, read through the allow-list."""
    try:
        with open(os.path.join(folder, ".metadata"), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{folder}/.metadata is not a plain sharded-checkpoint index ({e}); refused, since "
                              "loading it could run arbitrary code, or it is truncated") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{folder}: unreadable sharded-checkpoint metadata (a {type(metadata).__name__})")
    return metadata


def check_shard_entries(path: str, metadata=None) -> None:
    """Every non-tensor entry stored in one DCP shard file, loaded as `load_entry` does (`metadata`: its
    folder's, when the caller has read it already)."""
    folder, name = os.path.split(path)
    metadata = metadata or read_metadata(folder)
    with open(path, "rb") as f:
        for index, info in (metadata.storage_data or {}).items():
            if info.relative_path != name or not isinstance(metadata.state_dict_metadata.get(index.fqn),
                                                            BytesStorageMetadata):
                continue
            if getattr(info, "transform_descriptors", None):  # newer torch can compress entries
                raise CheckpointError(f"{index.fqn} in {path} is stored transformed "
                                      f"({info.transform_descriptors}), which cannot be checked; refused")
            f.seek(info.offset)
            load_entry(io.BytesIO(f.read(info.length)), f"{index.fqn} in {path}")


def check_sharded(folder: str):
    """A whole DCP folder: its `.metadata` and the non-tensor entries of every shard file; returns the
    metadata (read once)."""
    metadata = read_metadata(folder)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".distcp"):
            check_shard_entries(os.path.join(folder, name), metadata)
    return metadata


def validate_for_composer(path, specs: Optional[Sequence[Tuple[int, int]]] = None) -> bool:
    """Composer's checkpoint-validation hook: refuse (CheckpointError) a file that could run code when
    Composer opens it. `specs` (offset, length) come only for a DCP shard file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        read_metadata(path)
    elif os.path.basename(path) == ".metadata":
        read_metadata(os.path.dirname(path))
    elif specs is not None:
        check_shard_entries(path)
    else:
        load_pt(path)
    after = os.environ.get(NEXT_VALIDATOR)
    if after:
        module, _, name = after.rpartition(".")
        return getattr(importlib.import_module(module), name)(path, specs)
    return True


def refusal_inside(error: BaseException) -> Optional[CheckpointError]:
    """The CheckpointError that a DCP `CheckpointException` (raised on every rank when one rank's read
    failed) wraps, if any: our refusal, without DCP's wrapping."""
    for failure in getattr(error, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, CheckpointError):
            return cause
    return None
