"""Data prep in pieces, for many machines: `--num_shards K --shard_index i` writes piece i of K of the
input (a `sources.Piece`: contiguous, in input order) into `<split>/piece-0000i-of-0000K/`, and
`data-prep merge` publishes the split once every piece is there: one `index.json` over all pieces'
shards (streaming's index merging), written last, so a split with a missing or failed piece has no
`index.json` and no loader takes it for data. A Slurm array job, a batch system or Spark
(prep/spark.py) runs the pieces; any order, any machines sharing the output folder.

What the merge gives, for token rows (`--concat_tokens N`): each piece cuts rows from its own documents
and hands its last N to 2N-1 tokens (all of them when it has fewer) to the merge, which concatenates
these tails in piece order and cuts them into the last rows. The split then holds exactly the tokens a
one-machine run writes (the same ones dropped at the end: the tails end with the last piece's, which
holds the input's last N tokens, or all of its own and the pieces' before it that it needs), but a row that would span two pieces is
found among the tail rows instead. `merge --realign` rewrites every row in input order (one pass over
the tokens, no tokenizing): the shards are then byte-identical to the one-machine output.
`--no_wrap` cannot be pieced: where a piece starts changes which tokens it drops.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np
from streaming import LocalDataset

from llmfoundry_lite.data.mds import check_output_links, publish_split, token_column_encoding
from llmfoundry_lite.data.sources import Piece, input_files, load_hf_dataset
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.files import check_folder_path, read_json_file, remove_entries
from llmfoundry_lite.prep.convert import (
    Summary,
    TokenizeSpec,
    hf_texts,
    iter_json_files,
    iter_text_files,
    mark_done,
    merge_indexes,
    read_done,
    token_rows,
    write_mds,
    write_rows,
)

_NAME = re.compile(r"^\.?piece-(\d{5})-of-(\d{5})(\.partial(\.json)?)?$")
TAIL = "tail.npy"  # a piece's held-back tokens
TAIL_ROWS = "tail"  # the merge's folder of rows cut from the pieces' tails
REALIGNED = "rows"  # `merge --realign`'s folder of all rows


def piece_name(piece: Piece) -> str:
    return f"piece-{piece.index:05d}-of-{piece.count:05d}"


def check_piece(piece: Piece, spec: TokenizeSpec) -> None:
    if piece.count < 1 or not 0 <= piece.index < piece.count:
        raise UserError(f"--shard_index must be 0 .. --num_shards - 1 and --num_shards at least 1; "
                        f"got --shard_index {piece.index} --num_shards {piece.count}")
    if spec.concat_tokens and not spec.wrap:
        raise UserError("--no_wrap cannot be split into pieces: where a piece starts changes which tokens it drops; "
                        "prepare --no_wrap data in one run (without --num_shards)")


def _check_split_folder(split_dir: str, count: int, flag: str) -> None:
    """A split folder for pieces: new, or holding only pieces of `count` (and what interrupted runs left)."""
    check_output_links(split_dir, flag, link_ok=True)
    check_folder_path(split_dir, flag)
    if not os.path.isdir(split_dir):
        return
    if os.path.exists(os.path.join(split_dir, "index.json")):
        raise UserError(f"{split_dir} is already a merged split (it has index.json); remove it or choose another {flag}")
    for name in os.listdir(split_dir):
        match = _NAME.match(name)
        if match and int(match.group(2)) != count:
            raise UserError(f"{split_dir} holds pieces of another split into {int(match.group(2))} "
                            f"({name}); this run says --num_shards {count}. Use the same --num_shards for every piece, "
                            f"or another {flag}")
        if not match and not name.startswith(".merge-") and name not in (TAIL_ROWS, REALIGNED):
            raise UserError(f"{split_dir} holds {name}, which no data-prep piece wrote; pieces go into a new folder "
                            f"or one holding only pieces: choose another {flag}")


def write_piece(docs: Iterable[str], split_dir: str, piece: Piece, spec: TokenizeSpec, settings: Dict,
                compression: Optional[str] = None, num_workers: Optional[int] = None, flag: str = "--out_root",
                summary: Optional[Summary] = None) -> Summary:
    """Write piece `piece` of a split; a piece already written with the same `settings` is kept (a re-run
    of a job array redoes only what failed), one written with other settings is refused."""
    check_piece(piece, spec)
    _check_split_folder(split_dir, piece.count, flag)
    folder = os.path.join(split_dir, piece_name(piece))
    tok = build_tokenizer(spec.tokenizer, spec.tokenizer_kwargs) if spec.tokenizer else None
    settings = {**settings, "spec": asdict(spec), "compression": compression,
                "encoding": token_column_encoding(len(tok)) if tok else None}
    done = read_done(folder)
    if done is not None:
        if done["args"] != settings:
            raise UserError(f"{folder} was written with other settings; remove it to write it again")
        print(f"{folder} is already written")
        return Summary(**done["summary"])
    hold: Optional[List[np.ndarray]] = [] if spec.concat_tokens else None
    with publish_split(folder, flag) as tmp:
        summary = write_mds(docs, tmp, spec, compression, num_workers, summary, desc=piece_name(piece), hold=hold, tok=tok)
        if hold is not None:
            np.save(os.path.join(tmp, TAIL), hold[0] if hold else np.zeros(0, np.int64))
        mark_done(tmp, summary, settings)
    return summary


@dataclass
class PieceJob:
    """One split of a data prep, to be written piece by piece: by `--shard_index` runs, or as Spark tasks
    (it pickles). `source` is json (`path`: a file or folder), text (a folder of .txt files) or hf
    (`path`: the dataset, `hf`: load_dataset's split, name and data_files)."""
    source: str
    path: str
    split_dir: str
    spec: TokenizeSpec
    count: int
    text_column: str = "text"
    compression: Optional[str] = None
    skip_bad_lines: bool = False
    hf: Dict = field(default_factory=dict)
    num_workers: Optional[int] = None
    flag: str = "--out_root"

    def documents(self, piece: Piece, summary: Summary) -> Iterator[str]:
        if self.source == "json":
            return iter_json_files(self.path, self.text_column, summary.dropped, self.skip_bad_lines, piece)
        if self.source == "text":
            return iter_text_files(piece.files(input_files(self.path, (".txt",))))
        ds = load_hf_dataset(self.path, self.hf["split"], name=self.hf.get("name"), data_files=self.hf.get("data_files"))
        return hf_texts(ds.shard(self.count, piece.index, contiguous=True), self.text_column,
                        f"dataset {self.path!r} split {self.hf['split']!r}")

    def run(self, index: int) -> Summary:
        """Write piece `index`."""
        piece = Piece(index, self.count)
        check_piece(piece, self.spec)
        settings = {"source": self.source, "input": os.path.abspath(self.path) if self.source != "hf" else self.path,
                    "text_column": self.text_column, "hf": self.hf}
        summary = Summary()
        return write_piece(self.documents(piece, summary), self.split_dir, piece, self.spec, settings, self.compression,
                           self.num_workers, self.flag, summary)


def merge(split_dir: str, realign: bool = False) -> Summary:
    """Publish a split written in pieces (see the module docstring); returns the summary of all pieces."""
    if os.path.exists(os.path.join(split_dir, "index.json")):
        raise UserError(f"{split_dir} is already merged (it has index.json)")
    if not os.path.isdir(split_dir):
        raise UserError(f"{split_dir} does not exist: write its pieces first (--num_shards K --shard_index i)")
    found = {n: _NAME.match(n) for n in os.listdir(split_dir)}
    pieces = sorted(n for n, m in found.items() if m and not m.group(3))
    if not pieces:
        raise UserError(f"{split_dir} holds no pieces (piece-*-of-*): write them with --num_shards K --shard_index i")
    count = int(found[pieces[0]].group(2))
    missing = sorted(set(range(count)) - {int(found[n].group(1)) for n in pieces})
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise UserError(f"{split_dir}: {len(missing)} of {count} pieces are not written (--shard_index {shown}); "
                        "run them, then merge again. Nothing was published")
    folders = [os.path.join(split_dir, n) for n in pieces]
    dones = [read_done(f) for f in folders]
    if any(d is None for d in dones):  # a piece folder is only ever published with its marker
        raise DataError(f"{split_dir}: a piece folder has no done marker; remove it and write that piece again")
    settings = dones[0]["args"]
    for folder, done in zip(folders, dones, strict=True):
        if done["args"] != settings:
            raise UserError(f"{folder} was written with other settings than {folders[0]}; write every piece alike")
    total = Summary()
    for done in dones:
        total.add(Summary(**done["summary"]))
        total.seconds += done["summary"]["seconds"]  # the pieces' time together, not the job's
    if total.documents == 0:
        raise DataError(f"no documents in any piece of {split_dir} (dropped: {total.dropped})")
    spec = TokenizeSpec(**settings["spec"])
    remove_entries(split_dir, [TAIL_ROWS, REALIGNED])  # a merge interrupted before its index.json
    if spec.concat_tokens is None:  # raw text: the pieces in order are the split
        merge_indexes(split_dir, folders)
        return total
    encoding = settings["encoding"]
    if realign:
        return _realign(split_dir, folders, spec, settings["compression"], encoding, total)
    tails = np.concatenate([np.load(os.path.join(f, TAIL)) for f in folders])
    rows = Summary()
    if len(tails) >= spec.concat_tokens:
        write_rows(token_rows([(tails, [len(tails)])], spec, total.dropped), os.path.join(split_dir, TAIL_ROWS),
                   encoding, settings["compression"], rows)
        folders.append(os.path.join(split_dir, TAIL_ROWS))
    else:
        total.dropped.add("tokens in the last partial row", len(tails))
    total.add(rows)
    merge_indexes(split_dir, folders)
    return total


def _realign(split_dir: str, folders: List[str], spec: TokenizeSpec, compression: Optional[str], encoding: str,
             total: Summary) -> Summary:
    """All pieces' rows and tails, in order, cut again into rows from the start of the input."""
    if compression:
        raise UserError("merge --realign reads the pieces' rows back and needs them uncompressed: write the pieces "
                        "without --compression, or merge without --realign")

    def stream():
        for folder in folders:
            if read_json_file(os.path.join(folder, "index.json"), "a piece")["shards"]:  # else no rows to read
                rows = LocalDataset(folder)
                for i in range(len(rows)):
                    yield rows[i]["tokens"], ()
            yield np.load(os.path.join(folder, TAIL)), ()
    out = os.path.join(split_dir, REALIGNED)
    summary = Summary(documents=total.documents, dropped=total.dropped)
    write_rows(token_rows(stream(), spec, summary.dropped), out, encoding, compression, summary)
    merge_indexes(split_dir, [out])
    for folder in folders:  # the pieces' copies of these rows; the index no longer names them
        shutil.rmtree(folder)
    return summary
