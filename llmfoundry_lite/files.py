"""Checks of the paths a user gives, before any work starts, and atomic file writes (usable from every layer)."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import IO, Any, Iterator

from llmfoundry_lite.errors import UserError


def check_folder_path(path: str, flag: str) -> None:
    """`path` must be a folder or not exist yet, and none of its parents a file."""
    full = pathlib.Path(os.path.abspath(path))
    for current in (full, *full.parents):
        if current.exists() and not current.is_dir():
            what = "" if current == full else f" (in {path})"
            raise UserError(f"{flag}: {current}{what} is a file, not a folder; choose a folder path")


def read_json_file(path: str, what: str, missing_ok: bool = False) -> Any:
    """The JSON content of a file the user pointed at (as part of `what`), or a UserError naming the
    file, line and column; None for a missing file when `missing_ok`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{path} not found; {what} needs it") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); {what} needs a valid JSON file there") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"{what} needs a valid JSON file there: restore or rewrite it") from None


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """`open(path, mode)` for writing, through `path + ".tmp"` renamed over `path` when the block succeeds:
    a reader, or a run killed while writing, sees the old file or the new one, never half of one."""
    with open(f"{path}.tmp", mode, **open_kwargs) as f:
        yield f
    os.replace(f"{path}.tmp", path)
