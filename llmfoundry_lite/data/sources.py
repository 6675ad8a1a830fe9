"""Reading raw records: JSON/JSONL files (a line at a time, bad lines named or counted), Hugging Face
datasets, and `Counts`, the counts of what a reader or filter dropped. Data prep (prep/) and the
finetuning and preference loaders read their rows through these."""
from __future__ import annotations

import itertools
import json
import math
import os
from typing import Any, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from llmfoundry_lite.errors import DataError, UserError


class Counts(dict):
    """What data prep counted, dropped or skipped: what -> count, printed as '2 empty documents, 1 malformed lines'."""

    def add(self, what: str, n: int = 1) -> None:
        if n:
            self[what] = self.get(what, 0) + n

    def __str__(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in self.items()) or "nothing"


def input_files(path: str, suffixes) -> List[str]:
    """`path` itself if it is a file, else the files under the folder `path` ending with one of `suffixes`, sorted."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise UserError(f"input not found: {path}")
    files = sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names if n.endswith(suffixes))
    if not files:
        raise DataError(f"no {'/'.join(suffixes)} files in {path}")
    return files


class Piece(NamedTuple):
    """Piece `index` of `count` of an input (`--shard_index`, `--num_shards`): the files' bytes taken as one
    run, cut into `count` equal ranges; a record (a JSONL line, a .txt file, a JSON array file) belongs to
    the piece whose range holds its first byte. Pieces in order are the input in order."""
    index: int
    count: int

    def byte_range(self, files: Sequence[str]) -> Tuple[int, float]:
        """[lo, hi): the last piece's goes on past the end (empty files there start at the end)."""
        total = sum(os.path.getsize(f) for f in files)
        last = self.index == self.count - 1
        return total * self.index // self.count, math.inf if last else total * (self.index + 1) // self.count

    def files(self, files: Sequence[str]) -> List[str]:
        """The files whose first byte lies in this piece."""
        lo, hi = self.byte_range(files)
        starts = itertools.accumulate((os.path.getsize(f) for f in files), initial=0)
        return [f for f, start in zip(files, starts, strict=False) if lo <= start < hi]  # starts: one more


def _lines(f, name: str, lo: int, hi: int) -> Iterator[Tuple[str, bytes]]:
    """(`file:line`, line) for the lines of the open file `f` that start at a byte in [lo, hi); a line
    reached by seeking is named by its byte offset (its number is unknown without reading all before)."""
    pos = 0
    if lo > 0:
        f.seek(lo - 1)
        pos = lo - 1 + len(f.readline())  # the end of the line holding byte lo - 1: the first line from lo
    lineno = 1 if pos == 0 else None
    while pos < hi:
        raw = f.readline()
        if not raw:
            return
        yield (f"{name}:{lineno}" if lineno else f"{name} (the line at byte {pos})"), raw
        pos += len(raw)
        lineno = lineno and lineno + 1


def iter_json_records(path: str, dropped: Counts, skip_bad_lines: bool = False,
                      piece: Optional[Piece] = None) -> Iterator[Tuple[str, Any]]:
    """(`file:line`, record) of a .json/.jsonl file or a folder of them, read a line at a time (a JSON
    array file at once); a bad line is an error naming file and line, or a counted skip with
    `skip_bad_lines`. With `piece`: only that piece's records."""
    files = input_files(path, (".json", ".jsonl"))
    lo, hi = piece.byte_range(files) if piece else (0, math.inf)
    start = 0
    for name in files:
        size = os.path.getsize(name)
        first, start = start, start + size
        if not (first < hi and first + size > lo):  # no line of this file starts in the range
            continue
        with open(name, "rb") as f:
            if name.endswith(".json") and f.read(64).lstrip().startswith(b"["):
                if not lo <= first < hi:  # a JSON array belongs to the piece holding its first byte
                    continue
                f.seek(0)
                try:
                    records = json.loads(f.read().decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{name}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{name}: invalid JSON at line {e.lineno}: {e.msg}") from None
                for i, rec in enumerate(records):
                    yield f"{name}:[{i}]", rec
                continue
            f.seek(0)
            for where, raw in _lines(f, name, max(0, lo - first), hi - first):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    rec = json.loads(line)
                except UnicodeDecodeError as e:
                    problem = f"not UTF-8 (byte {e.start} of the line); re-encode the file as UTF-8"
                    kind = "undecodable lines"
                except json.JSONDecodeError as e:
                    problem, kind = f"malformed JSON ({e.msg}); fix the line", "malformed lines"
                else:
                    yield where, rec
                    continue
                if not skip_bad_lines:
                    raise DataError(f"{where}: {problem} or pass --skip_bad_lines to skip and count such lines")
                dropped.add(kind)


def load_hf_dataset(dataset: str, split: str, **kwargs):
    """`datasets.load_dataset(dataset, split=split, **kwargs)` with its failures as DataErrors."""
    import datasets  # lazy: only the HF-dataset sources need it (slow to import)
    try:
        return datasets.load_dataset(dataset, split=split, **kwargs)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetsError) as e:
        cause = (e.__cause__ or e.__context__) if isinstance(e, datasets.exceptions.DatasetGenerationError) else None
        detail = str(e).splitlines()[0] + (f" ({str(cause).splitlines()[0]})" if cause else "")
        raise DataError(f"cannot load dataset {dataset!r} split {split!r}: {detail}") from None
