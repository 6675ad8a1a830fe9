"""Pretraining data prep: documents (HF datasets, JSON/JSONL, .txt folders) -> MDS shards.

With `concat_tokens=N` every document becomes `bos + tokens + eos`, the documents are concatenated
and cut into rows of exactly N ids (a `tokens` column, see `mds.token_column_encoding`); `wrap=False`
drops the rest of a document once a row is cut from it, as llm-foundry's `--no_wrap` does. Without
`concat_tokens` the shards hold the raw `text`. Nothing is dropped silently: `Summary.dropped` counts
empty documents, malformed lines and the tokens that did not fill a last row.

Tokenizing runs on `num_workers` threads (default: every core the process may use), each encoding a
batch of documents at a time on one core, while the main thread reads input, cuts rows and writes
shards in input order: the output does not depend on the worker count. `.txt` folders are converted
in groups of files, each group into its own sub-folder with a
done marker, so a re-run after a crash skips the finished groups; the group indexes are then merged
into one `index.json` and a top-level done marker records the summary. The folder's
`.llmfoundry_lite.json` lists the entries the conversion writes: only those are ever replaced or
removed (`--reprocess`), and a folder without it is refused unless `--overwrite` (files.py).

An object-store output (`--out_root s3://bucket/prefix`, `Output`) is checked before any work (the
bucket reachable, each split's prefix new or data prep's own, else `--overwrite`), each split is written
to a local staging folder and uploaded when it is finished, its `index.json` last: a failed or killed
data prep leaves no `index.json` in the bucket for a split it did not finish (stores.publish_folder).
"""
from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
from streaming import MDSWriter
from streaming.base.util import merge_index
from tokenizers import Tokenizer
from tqdm import tqdm

from llmfoundry_lite import stores
from llmfoundry_lite.data.mds import (
    SHARD_HASHES,
    check_output_folder,
    check_output_links,
    publish_split,
    token_column_encoding,
)
from llmfoundry_lite.data.sources import Counts, Piece, input_files, iter_json_records, load_hf_dataset
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import DataError, StoreError, UserError
from llmfoundry_lite.files import atomic_write, check_folder_path, claim_folder, read_json_file, remove_entries

DONE = ".done"  # marker: a folder's conversion finished; holds the summary as JSON
TEXT_WRITER = "data-prep text"  # named in the manifest of the folders convert_text writes (files.py)
BATCH, BATCH_CHARS = 256, 1 << 18  # a tokenizing task: this many documents, or fewer of this many characters


@dataclass
class TokenizeSpec:
    """How documents become token rows (None tokenizer: keep raw text)."""
    tokenizer: Optional[str] = None
    tokenizer_kwargs: Dict = field(default_factory=dict)
    concat_tokens: Optional[int] = None
    bos_text: str = ""
    eos_text: str = ""
    wrap: bool = True

    def __post_init__(self) -> None:
        if (self.tokenizer is None) != (self.concat_tokens is None):
            raise UserError("--concat_tokens and --tokenizer go together: give both (token rows) or neither (raw text)")
        if self.concat_tokens is not None and self.concat_tokens < 1:
            raise UserError(f"--concat_tokens must be positive, got {self.concat_tokens}")


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dropped: Counts = field(default_factory=Counts)

    def __post_init__(self):  # from a done marker's JSON
        self.dropped = Counts(self.dropped)

    def add(self, other: "Summary") -> None:
        for k in ("documents", "tokens", "samples", "shards", "bytes"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for what, n in other.dropped.items():
            self.dropped.add(what, n)

    def __str__(self) -> str:
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return (f"{self.documents} documents -> {self.samples} samples, {self.tokens} tokens, "
                f"{self.shards} shards, {self.bytes / 1e6:.2f} MB in {self.seconds:.1f}s "
                f"({rate:,.0f} tokens/s); dropped: {self.dropped}")


# ---- reading documents -------------------------------------------------------------------------

def iter_json_files(path: str, column: str, dropped: Counts, skip_bad_lines: bool = False,
                    piece: Optional[Piece] = None) -> Iterator[str]:
    """Texts (the `column` field) from a .json/.jsonl file or a folder of them (or one piece of them)."""
    for where, rec in iter_json_records(path, dropped, skip_bad_lines, piece):
        if not isinstance(rec, dict) or column not in rec:
            have = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: no '{column}' field (has {have}); choose the field with --text_column")
        if not isinstance(rec[column], str):
            raise DataError(f"{where}: '{column}' is a {type(rec[column]).__name__}, not text; fix the line or "
                            "choose the text field with --text_column")
        yield rec[column]


def hf_texts(ds, column: str, what: str) -> Iterator[str]:
    """The `column` texts of a `datasets.Dataset`, read in Arrow batches."""
    if column not in ds.column_names:
        raise DataError(f"{what} has no column '{column}' (columns: {ds.column_names}); choose one with --text_column")
    return (text for rows in ds.iter(batch_size=BATCH) for text in rows[column])


def iter_text_files(files: Sequence[str]) -> Iterator[str]:
    """One document per .txt file."""
    for name in files:
        try:
            with open(name, encoding="utf-8") as f:
                yield f.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{name}: not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None


def _documents(docs: Iterable[str], summary: Summary) -> Iterator[str]:
    """The non-empty documents, counted in `summary` (the empty ones as dropped)."""
    for doc in docs:
        if not isinstance(doc, str):
            raise DataError(f"document {summary.documents} is a {type(doc).__name__}, not text")
        if not doc or doc.isspace():
            summary.dropped.add("empty documents")
            continue
        summary.documents += 1
        yield doc


# ---- tokenizing: `num_workers` threads, each encoding one batch at a time -----------------------

def _encoder(tok, bos: List[int], eos: List[int], dtype: str):
    """A function: a batch of documents -> (one array of `bos + ids + eos` for each in turn, their lengths).

    A fast tokenizer's Rust side (`encode_batch_fast`: the ids of `encode_batch` without the character
    offsets data prep never reads) runs without the GIL, so threads calling it tokenize in parallel
    while the main thread reads input and writes shards. Its truncation and padding are off, as
    `tok(texts)` turns them off."""
    if getattr(tok, "is_fast", False):
        backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        encode = lambda texts: [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]  # noqa: E731
    else:
        encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]  # noqa: E731

    def encode_batch(texts: List[str]):
        flat: List[int] = []
        lengths = []
        for ids in encode(texts):
            flat += bos
            flat += ids
            flat += eos
            lengths.append(len(bos) + len(ids) + len(eos))
        return np.array(flat, dtype=dtype), lengths
    return encode_batch


@contextlib.contextmanager
def _one_thread_per_encode() -> Iterator[None]:
    """Each `encode_batch` call on one core, so that `num_workers` threads use `num_workers` cores (the
    tokenizers library reads TOKENIZERS_PARALLELISM at every call; the caller's value is put back)."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def _batches(documents: Iterator[str]) -> Iterator[List[str]]:
    """Lists of up to BATCH documents, ended early at BATCH_CHARS characters: long documents (whole
    .txt files) in small enough tasks to keep every worker busy."""
    batch: List[str] = []
    chars = 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc)
        if len(batch) == BATCH or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _in_order(pool: ThreadPoolExecutor, fn, items: Iterator, window: int) -> Iterator:
    """`fn(item)` for each item, run on the pool with at most `window` in flight, yielded in input order."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ---- cutting rows ------------------------------------------------------------------------------

def token_rows(tokenized: Iterable, spec: TokenizeSpec, dropped: Counts, hold: Optional[List] = None) -> Iterator[np.ndarray]:
    """Blocks of rows (`rows x concat_tokens` arrays) cut from the concatenated documents.

    With `hold` (a list), the last `concat_tokens` to `2 * concat_tokens - 1` tokens (or all, when
    fewer) are not cut but appended to it: a piece of a sharded job hands them to the merge, which
    cuts them together with the next pieces' (prep/pieces.py). Without, they are cut and the tokens
    that do not fill a last row are dropped."""
    size = spec.concat_tokens
    rest = None
    for flat, lengths in tokenized:
        if spec.wrap:
            rest = flat if rest is None else np.concatenate([rest, flat])
            rows = len(rest) // size - (hold is not None)  # keep one row back for the merge
            if rows > 0:
                yield rest[:rows * size].reshape(rows, size)
                rest = rest[rows * size:]
            continue
        start = 0
        for n in lengths:  # --no_wrap: a row ends a document; the rest of it is dropped
            doc = flat[start:start + n]
            start += n
            rest = doc if rest is None else np.concatenate([rest, doc])
            if len(rest) >= size:
                yield rest[None, :size]
                dropped.add("tokens after a row cut (--no_wrap)", len(rest) - size)
                rest = rest[:0]
    if rest is None:
        return
    if hold is not None:
        hold.append(rest)
        return
    rows = len(rest) // size
    if rows:
        yield rest[:rows * size].reshape(rows, size)
    dropped.add("tokens in the last partial row", len(rest) - rows * size)


# ---- writing -----------------------------------------------------------------------------------

def default_workers() -> int:
    """The cores this process may run on (its CPU affinity: taskset, a Slurm allocation, a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def write_mds(docs: Iterable[str], out_dir: str, spec: TokenizeSpec, compression: Optional[str] = None,
              num_workers: Optional[int] = None, summary: Optional[Summary] = None, desc: str = "",
              hold: Optional[List] = None, tok=None) -> Summary:
    """Write documents to one MDS folder (`tokens` rows or `text`); returns the summary. `hold`: see
    `token_rows`; `tok`: `spec`'s tokenizer when the caller has built it already."""
    summary = summary or Summary()
    start = time.time()
    if spec.tokenizer and tok is None:
        tok = build_tokenizer(spec.tokenizer, spec.tokenizer_kwargs)
    bar = tqdm(desc=desc or os.path.basename(out_dir), unit=" tok" if tok else " doc", unit_scale=True, mininterval=1.0)
    documents = _documents(docs, summary)
    if tok is None:
        with bar, MDSWriter(out=out_dir, columns={"text": "str"}, compression=compression, hashes=SHARD_HASHES) as writer:
            for text in documents:
                writer.write({"text": text})
                summary.samples += 1
                bar.update(1)
        _count_shards(out_dir, summary)
        summary.seconds += time.time() - start
        return summary
    encoding = token_column_encoding(len(tok))
    bos, eos = (tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in (spec.bos_text, spec.eos_text))
    encode = _encoder(tok, bos, eos, encoding.split(":")[1])
    batches = _batches(documents)
    workers = num_workers or default_workers()
    if workers < 1:
        raise UserError(f"--num_workers (--processes) must be at least 1, got {workers}")
    with bar, _one_thread_per_encode(), ThreadPoolExecutor(workers) as pool:
        try:
            blocks = token_rows(_in_order(pool, encode, batches, window=2 * workers), spec, summary.dropped, hold)
            write_rows(blocks, out_dir, encoding, compression, summary, bar)
        finally:
            pool.shutdown(cancel_futures=True)
    summary.seconds += time.time() - start
    return summary


def write_rows(blocks: Iterable[np.ndarray], out_dir: str, encoding: str, compression: Optional[str],
               summary: Summary, bar: Optional[tqdm] = None) -> None:
    """Write blocks of token rows to one MDS folder, counted in `summary`."""
    dtype = encoding.split(":")[1]
    with MDSWriter(out=out_dir, columns={"tokens": encoding}, compression=compression, hashes=SHARD_HASHES) as writer:
        for block in blocks:
            for row in block.astype(dtype, copy=False):
                writer.write({"tokens": row})
            summary.samples += len(block)
            summary.tokens += block.size
            if bar is not None:
                bar.update(block.size)
    _count_shards(out_dir, summary)


def _count_shards(out_dir: str, summary: Summary) -> None:
    shards = read_json_file(os.path.join(out_dir, "index.json"), "data prep")["shards"]
    summary.shards += len(shards)
    summary.bytes += sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in shards)


def _require_documents(summary: Summary, source: str) -> Summary:
    if summary.documents == 0:
        raise DataError(f"no documents in {source}: the input is empty (dropped: {summary.dropped})")
    return summary


def mark_done(folder: str, summary: Summary, args: Dict) -> None:
    with atomic_write(os.path.join(folder, DONE)) as f:
        json.dump({"args": args, "summary": asdict(summary)}, f)


def read_done(folder: str) -> Optional[Dict]:
    return read_json_file(os.path.join(folder, DONE), "a finished conversion", missing_ok=True)


# ---- where the splits go: a local folder, or an object-store prefix -----------------------------

class Output:
    """The splits' output under `out_root`: local folders (checked by each conversion, as ever), or for an
    object store (`s3://...`) local staging folders, each uploaded by `publish` once finished, its
    `index.json` last. Before any work an object store must be reachable and each split's prefix new,
    empty or written by `writer` (its manifest object), else `overwrite` (stores.claim_prefix)."""
    OVERWRITE_DOES = "it replaces the objects of the names it writes"

    def __init__(self, out_root: str, splits: Sequence[Optional[str]], writer: str, overwrite: bool = False,
                 flag: str = "--out_root", resumable: bool = False):
        self.out_root, self.writer, self.overwrite, self.flag = out_root, writer, overwrite, flag
        self.remote = stores.is_remote(out_root)
        if not self.remote:
            return
        problem = stores.probe(out_root, "bucket")
        if problem:
            raise StoreError(f"{flag} {problem}")
        for split in splits:
            stores.claim_prefix(self.uri(split), writer, flag, overwrite, overwrite_does=self.OVERWRITE_DOES)
        self.staging = stores.local_mirror(out_root, "staging")
        if not resumable:  # only ever a copy on its way to the bucket (`convert_text` resumes in it)
            shutil.rmtree(self.staging, ignore_errors=True)

    def uri(self, split: Optional[str]) -> str:
        if not split:
            return self.out_root
        return stores.join(self.out_root, split) if self.remote else os.path.join(self.out_root, split)

    def local(self, split: Optional[str]) -> str:
        """The folder the split is written to (for an object store: in the staging folder)."""
        return os.path.join(self.staging, split or "_") if self.remote else self.uri(split)

    def publish(self, split: Optional[str]) -> str:
        """Upload the finished split (object stores; index.json last); returns where it now is."""
        if self.remote:
            stores.publish_folder(self.local(split), self.uri(split), self.writer, self.flag, self.overwrite,
                                  last=["index.json"], overwrite_does=self.OVERWRITE_DOES)
            shutil.rmtree(self.local(split), ignore_errors=True)
        return self.uri(split)


# ---- the three pretraining conversions ---------------------------------------------------------

def convert_hf(dataset: str, out_root: str, splits: Sequence[str], spec: TokenizeSpec, subset: Optional[str] = None,
               data_files=None, text_column: str = "text", compression: Optional[str] = None,
               num_workers: Optional[int] = None, overwrite: bool = False) -> Dict[str, Summary]:
    """`datasets.load_dataset(dataset, subset, data_files)` splits -> `out_root/<split>/` (a local folder
    or an object-store prefix, see `Output`; `overwrite` only concerns the latter)."""
    output = Output(out_root, splits, "data-prep hf", overwrite)
    for split in splits:
        check_output_folder(output.local(split))
    summaries = {}
    for split in splits:
        with publish_split(output.local(split)) as tmp:
            docs = hf_texts(load_hf_dataset(dataset, split, name=subset, data_files=data_files), text_column,
                            f"dataset {dataset!r} split {split!r}")
            summaries[split] = _require_documents(write_mds(docs, tmp, spec, compression, num_workers, desc=split),
                                                  f"{dataset} split {split}")
        output.publish(split)
    return summaries


def convert_json(path: str, out_root: str, spec: TokenizeSpec, split: Optional[str] = None,
                 text_column: str = "text", compression: Optional[str] = None, num_workers: Optional[int] = None,
                 skip_bad_lines: bool = False, overwrite: bool = False) -> Summary:
    """A .json/.jsonl file or folder -> `out_root` (or `out_root/<split>` when a split is named): a local
    folder or an object-store prefix (see `Output`; `overwrite` only concerns the latter)."""
    output = Output(out_root, [split], "data-prep json", overwrite)
    out = output.local(split)
    summary = Summary()
    with publish_split(out) as tmp:
        docs = iter_json_files(path, text_column, summary.dropped, skip_bad_lines)
        _require_documents(write_mds(docs, tmp, spec, compression, num_workers, summary,
                                     desc=split or os.path.basename(output.uri(None).rstrip("/"))), path)
    output.publish(split)
    return summary


def convert_text(input_folder: str, output_folder: str, spec: TokenizeSpec, compression: Optional[str] = None,
                 processes: Optional[int] = None, files_per_group: Optional[int] = None, reprocess: bool = False,
                 overwrite: bool = False) -> Summary:
    """A folder of .txt files -> one MDS folder, resumable (see the module docstring).

    `output_folder` must be new, empty or one this function wrote (its manifest, see files.py); then
    `reprocess` removes what it wrote there (only that) and starts over. Any other folder is refused
    unless `overwrite`: then the entries of the names it writes (plan.json, index.json, .done, group_*)
    are replaced and every other file is kept. A symbolic link to a folder is that folder (the conversion
    writes into it); a link to a file or to nothing is refused."""
    check_output_links(output_folder, "--output_folder", link_ok=True)
    check_folder_path(output_folder, "--output_folder")
    files = input_files(input_folder, (".txt",))
    args = {"input_folder": os.path.abspath(input_folder), "spec": asdict(spec), "compression": compression,
            "files": len(files)}
    per_group = files_per_group or max(1, math.ceil(len(files) / (4 * (processes or 1))))
    groups = [files[i:i + per_group] for i in range(0, len(files), per_group)]
    names = ["plan.json", "index.json", DONE, *(f"group_{i:05d}" for i in range(len(groups)))]
    ours = claim_folder(output_folder, TEXT_WRITER, "--output_folder", overwrite, names,
                        overwrite_does="it replaces its plan.json, index.json, .done and group_* entries")
    if reprocess:  # everything this command wrote here, in this run's plan or an earlier one
        remove_entries(output_folder, ours | set(names))
    elif overwrite:  # entries of our names that this command did not write: not a conversion to resume
        remove_entries(output_folder, set(names) - ours)
    done = read_done(output_folder)
    if done is not None:
        if done["args"] != args:
            raise UserError(f"{output_folder} holds a finished conversion made with other settings; "
                            "pass --reprocess to redo it or choose another --output_folder")
        print(f"{output_folder} is already converted (remove {DONE} or pass --reprocess to redo it)")
        return Summary(**done["summary"])
    plan = {"args": args, "groups": len(groups), "files_per_group": per_group}
    plan_path = os.path.join(output_folder, "plan.json")
    old_plan = read_json_file(plan_path, "resuming the conversion", missing_ok=True)
    if old_plan is None:
        with atomic_write(plan_path) as f:
            json.dump(plan, f)
    elif old_plan != plan:
        raise UserError(f"{output_folder} holds an unfinished conversion made with other settings; "
                        "pass --reprocess to start over or choose another --output_folder")
    folders = [os.path.join(output_folder, f"group_{i:05d}") for i in range(len(groups))]
    tok = build_tokenizer(spec.tokenizer, spec.tokenizer_kwargs) if spec.tokenizer else None  # once, not per group
    todo = [(g, f, spec, compression, processes, tok) for g, f in zip(groups, folders, strict=True) if read_done(f) is None]
    if len(todo) < len(groups):
        print(f"resuming: {len(groups) - len(todo)} of {len(groups)} groups already done")
    start = time.time()
    for job in todo:
        _convert_group(*job)
    total = Summary()
    for folder in folders:
        total.add(Summary(**read_done(folder)["summary"]))
    total.seconds = time.time() - start
    _require_documents(total, input_folder)
    merge_indexes(output_folder, folders)
    mark_done(output_folder, total, args)
    return total


def _convert_group(files: List[str], folder: str, spec: TokenizeSpec, compression: Optional[str], workers: int,
                   tok) -> None:
    remove_entries(os.path.dirname(folder), [os.path.basename(folder)])  # a crashed attempt's partial shards
    summary = write_mds(iter_text_files(files), folder, spec, compression, workers, desc=os.path.basename(folder),
                        tok=tok)
    mark_done(folder, summary, {"files": files})


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """merge_index logs a warning about its temporary folder on the root logger at every call."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def merge_indexes(out_dir: str, folders: Sequence[str]) -> None:
    """One `out_dir/index.json` over the shards of `folders` (sub-folders of `out_dir`, in this order),
    by streaming's index merging; written to a temporary folder first and renamed into place, so that
    a reader sees no index or the whole one."""
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".merge-") as tmp, _quiet_root_logger():
        merge_index([os.path.join(f, "index.json") for f in folders], tmp)
        os.replace(os.path.join(tmp, "index.json"), os.path.join(out_dir, "index.json"))
