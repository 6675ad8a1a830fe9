"""Reading raw records: JSON/JSONL files (a line at a time, bad lines named or counted), Hugging Face
datasets, and `Counts`, the counts of what a reader or filter dropped. Data prep (prep/) and the
finetuning and preference loaders read their rows through these."""
from __future__ import annotations

import json
import os
from typing import Any, Iterator, List, Tuple

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


def iter_json_records(path: str, dropped: Counts, skip_bad_lines: bool = False) -> Iterator[Tuple[str, Any]]:
    """(`file:line`, record) of a .json/.jsonl file or a folder of them, read a line at a time (a JSON
    array file at once); a bad line is an error naming file and line, or a counted skip with
    `skip_bad_lines`."""
    for name in input_files(path, (".json", ".jsonl")):
        with open(name, "rb") as f:
            if name.endswith(".json") and f.read(64).lstrip().startswith(b"["):
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
            for lineno, raw in enumerate(f, 1):
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
                    yield f"{name}:{lineno}", rec
                    continue
                if not skip_bad_lines:
                    raise DataError(f"{name}:{lineno}: {problem} or pass --skip_bad_lines to skip and count such lines")
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
