"""Checks of the paths a user gives, before any work starts, and atomic file writes (usable from every layer)."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from typing import IO, Any, Callable, Iterable, Iterator, List, Optional, Sequence, Set

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


# --- output folders: a command replaces or removes only what it wrote ----------------------------
# A command that writes into a folder records what it wrote there in MANIFEST (which command, which
# entries). A re-run of the same command may replace or remove those entries, and nothing else; a folder
# holding anything else (a user's files, another command's output, a folder of an earlier version of
# this project, which wrote no manifest) is refused unless the user passes --overwrite, which lets the
# command replace the entries it writes and still keeps every other file.

MANIFEST = ".llmfoundry_lite.json"
STAGING = ".llmfoundry_lite.tmp"  # where staged_folder writes before moving into place (ours by name)


def _manifest(folder: str) -> Optional[dict]:
    """The folder's manifest, or None when it has none (or one no program of ours could have written)."""
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("writer"), str) and isinstance(data.get("files"), list)
    return data if ok and all(isinstance(n, str) and _inside(n) for n in data["files"]) else None


def _inside(name: str) -> bool:
    """A relative path that stays in its folder (a manifest never names anything outside it)."""
    norm = os.path.normpath(name)
    return bool(name) and not os.path.isabs(name) and norm != "." and not norm.startswith("..")


def _write_manifest(folder: str, writer: str, files: Iterable[str]) -> None:
    with atomic_write(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
        json.dump({"writer": writer, "files": sorted(set(files)),
                   "about": "written by llmfoundry-lite: the entries its re-runs may replace or remove"}, f, indent=1)


def _entries(folder: str) -> List[str]:
    try:
        return sorted(set(os.listdir(folder)) - {MANIFEST, STAGING})
    except FileNotFoundError:
        return []


def _refusal(folder: str, flag: str, writer: str, foreign: Sequence[str], manifest: Optional[dict],
             overwrite_flag: str, overwrite_does: str) -> UserError:
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    if manifest is None:
        whose = f"it has no {MANIFEST} of ours: a user's folder, or one written by an older llmfoundry-lite"
    elif manifest["writer"] != writer:
        whose = f"its {MANIFEST} says llmfoundry-lite's {manifest['writer']} wrote it"
    else:
        whose = f"they are not among the files its {MANIFEST} lists"
    return UserError(f"{flag} {folder}: holds {shown}, which llmfoundry-lite's {writer} did not write ({whose}); "
                     f"nothing was changed. Choose a new or empty folder, or pass {overwrite_flag} to write there "
                     f"anyway: {overwrite_does}; every other file is kept")


def claim_folder(folder: str, writer: str, flag: str, overwrite: bool = False, names: Iterable[str] = (),
                 mark: bool = True, overwrite_flag: str = "--overwrite",
                 overwrite_does: str = "it replaces the files of the names it writes") -> Set[str]:
    """Check, before any work, that `writer` (e.g. "data-prep text") may write `names` (and, when the
    command cannot know them yet, other entries) into `folder`; return the entries it wrote there before,
    which it may replace or remove.

    Allowed: a missing or empty folder, or one whose MANIFEST is `writer`'s (and then `names` must be
    absent or listed in it), or anything with `overwrite`. Else a UserError naming the folder, what it
    holds and `overwrite_flag`. With `mark`, the folder is created and its MANIFEST lists the earlier
    entries plus `names` (so a run killed half-way is still recognised as ours); an unwritable location is
    a UserError too. `mark=False` only checks (nothing is written)."""
    check_folder_path(folder, flag)
    manifest = _manifest(folder)
    own = set(manifest["files"]) if manifest is not None and manifest["writer"] == writer else None
    present = _entries(folder)
    foreign = present if own is None else [n for n in names if os.path.lexists(os.path.join(folder, n)) and n not in own]
    if foreign and not overwrite:
        raise _refusal(folder, flag, writer, foreign, manifest, overwrite_flag, overwrite_does)
    full = pathlib.Path(os.path.abspath(folder))
    existing = next(p for p in (full, *full.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # also a read-only file system, even for root
        raise UserError(f"{flag} {folder}: cannot write to {existing} (read-only or not yours); "
                        "choose a folder you can write to")
    if not mark:
        return own or set()
    try:
        os.makedirs(folder, exist_ok=True)
        _write_manifest(folder, writer, (own or set()) | set(names))
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None
    return own or set()


def remove_entries(folder: str, names: Iterable[str]) -> None:
    """Remove these entries of `folder` (files, folders, links: a link is removed, never what it points to)."""
    for name in sorted(set(names)):
        if not _inside(name):
            raise ValueError(f"{name!r} is not inside {folder}")
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


@contextlib.contextmanager
def staged_folder(folder: str, writer: str, flag: str, overwrite: bool = False,
                  superseded: Optional[Callable[[str], bool]] = None, overwrite_flag: str = "--overwrite",
                  overwrite_does: str = "it replaces the files of the names it writes") -> Iterator[str]:
    """Yield an empty staging folder (inside `folder`) to write the command's output into; when the
    block succeeds its entries replace those of the same names in `folder`, and the entries `writer`
    wrote there before and did not write again are removed, as are existing entries `superseded` says the
    new ones replace (e.g. weight files that would mix with new ones). Entries that would be replaced
    but are not `writer`'s need `overwrite` (see `claim_folder`, which runs first): then nothing was
    changed. A failure leaves `folder` as it was; a folder this call created and left empty is removed."""
    created = not os.path.exists(folder)
    own = claim_folder(folder, writer, flag, overwrite, (), True, overwrite_flag, overwrite_does)
    staging = os.path.join(folder, STAGING)
    remove_entries(folder, [STAGING])  # left by a killed run
    os.makedirs(staging)
    try:
        yield staging
        new = set(os.listdir(staging))
        present = set(_entries(folder))
        replaced = {n for n in present if n in new or (superseded is not None and superseded(n))}
        foreign = sorted(replaced - own)
        if foreign and not overwrite:
            raise _refusal(folder, flag, writer, foreign, _manifest(folder), overwrite_flag, overwrite_does)
        _write_manifest(folder, writer, own | new)  # a kill from here on leaves only listed entries
        for name in sorted(new):
            src, dest = os.path.join(staging, name), os.path.join(folder, name)
            if os.path.isdir(src) or (os.path.isdir(dest) and not os.path.islink(dest)):
                remove_entries(folder, [name])  # a file replaces a file (or link) in one rename
            os.replace(src, dest)
        remove_entries(folder, ((own & present) | replaced) - new)
        _write_manifest(folder, writer, new)
    except BaseException:
        if created and not _entries(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
