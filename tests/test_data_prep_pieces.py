"""Data prep in pieces (--num_shards/--shard_index, `data-prep merge`), against the one-machine run."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import stdlib_docstrings
from streaming import LocalDataset

from llmfoundry_lite import cli
from llmfoundry_lite.data.mds import check_local_split
from llmfoundry_lite.data.sources import Counts, Piece, iter_json_records
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.prep.convert import TokenizeSpec, convert_hf, convert_json, convert_text
from llmfoundry_lite.prep.pieces import PieceJob, merge

EOS = "<|endoftext|>"
ROW = 16


@pytest.fixture(scope="module")
def docs():
    return [d for d in stdlib_docstrings(80_000).split("\n\n") if d.strip()][:200]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("pieces_in") / "in.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def tokens(folder):
    ds = LocalDataset(folder)
    return [ds[i]["tokens"] for i in range(len(ds))]


def shard_bytes(folder):
    index = json.load(open(os.path.join(folder, "index.json")))
    return [open(os.path.join(folder, s["raw_data"]["basename"]), "rb").read() for s in index["shards"]]


def data_prep(*args):
    return [sys.executable, "-m", "llmfoundry_lite.cli", "data-prep", *args]


def test_pieces_split_every_record_once_in_order(tmp_path):
    """Byte ranges over several files: each record in exactly one piece, pieces in order = the input, for
    lines of all lengths, blank lines, a line starting right at a boundary and a JSON array file."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "in"
    folder.mkdir()
    expected = []
    for f in range(3):
        lines = []
        for i in range(int(rng.integers(1, 40))):
            rec = {"text": "x" * int(rng.integers(0, 300)), "id": f"{f}-{i}"}
            lines.append(json.dumps(rec) + "\n" + ("\n" if i % 7 == 3 else ""))
            expected.append(rec["id"])
        (folder / f"{f}.jsonl").write_text("".join(lines))
    (folder / "3.json").write_text(json.dumps([{"text": "a", "id": "array-0"}, {"text": "b", "id": "array-1"}]))
    (folder / "4.json").write_text("".join(json.dumps({"text": "c", "id": f"lines-{i}"}) + "\n" for i in range(9)))
    (folder / "5.jsonl").write_text("")  # an empty last file
    expected += ["array-0", "array-1"] + [f"lines-{i}" for i in range(9)]
    everything = [r["id"] for _, r in iter_json_records(str(folder), Counts())]
    assert everything == expected
    for count in (1, 2, 3, 5, 13, 200):
        got = [r["id"] for i in range(count) for _, r in iter_json_records(str(folder), Counts(), piece=Piece(i, count))]
        assert got == expected, count
    # a line reached by seeking is named by its byte offset
    (folder / "0.jsonl").write_text('{"text": "a", "id": 0}\n' * 50 + "{broken\n")
    with pytest.raises(DataError, match=r"0.jsonl \(the line at byte 1150\): malformed JSON"):
        list(iter_json_records(str(folder / "0.jsonl"), Counts(), piece=Piece(1, 2)))


def test_pieces_run_as_separate_processes_then_merge(tiny_tokenizer_dir, tmp_path, jsonl, docs):
    """Three pieces as three concurrent processes; the merge publishes the tokens of the one-machine run
    (the same multiset, rows and dropped tokens); `--realign` gives its very shards."""
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=ROW, eos_text=EOS)
    one = convert_json(jsonl, str(tmp_path / "one"), spec)
    token_args = ["--concat_tokens", str(ROW), "--tokenizer", tiny_tokenizer_dir, "--eos_text", EOS]
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(data_prep("json", "--path", jsonl, "--out_root", str(out), "--split", "train", *token_args,
                                       "--num_shards", "3", "--shard_index", str(i), "--num_workers", "1"),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (2, 0)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stdout.read()
    split = str(out / "train")
    # piece 1 missing: no index, the loader and the merge say what to do, nothing is published
    with pytest.raises(DataError, match="never merged"):
        check_local_split(split)
    with pytest.raises(UserError, match=r"1 of 3 pieces are not written \(--shard_index 1\)"):
        merge(split)
    assert not os.path.exists(os.path.join(split, "index.json"))
    last = subprocess.run(data_prep("json", "--path", jsonl, "--out_root", str(out), "--split", "train", *token_args,
                                    "--num_shards", "3", "--shard_index", "1"), env=env, capture_output=True, text=True)
    assert last.returncode == 0, last.stderr
    again = subprocess.run(data_prep("json", "--path", jsonl, "--out_root", str(out), "--split", "train", *token_args,
                                     "--num_shards", "3", "--shard_index", "1"), env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "is already written" in again.stdout  # a job array's re-run redoes nothing
    shutil.copytree(split, tmp_path / "copy")

    merged = merge(split)
    assert (merged.documents, merged.samples, merged.tokens) == (one.documents, one.samples, one.tokens)
    assert merged.dropped == one.dropped
    a, b = tokens(str(tmp_path / "one")), tokens(split)
    assert np.array_equal(np.sort(np.concatenate(a)), np.sort(np.concatenate(b)))
    assert sum(x.tolist() == y.tolist() for x, y in zip(a, b, strict=True)) < len(a)  # not the same order: honest
    with pytest.raises(UserError, match="already merged"):
        merge(split)

    realigned = merge(str(tmp_path / "copy"), realign=True)
    assert (realigned.samples, realigned.tokens, realigned.dropped) == (one.samples, one.tokens, one.dropped)
    assert shard_bytes(str(tmp_path / "copy")) == shard_bytes(str(tmp_path / "one"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["index.json", "rows"]


def test_text_and_hf_pieces_realign_to_the_one_machine_output(tiny_tokenizer_dir, tmp_path, jsonl, docs):
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=ROW, eos_text=EOS)
    txt = tmp_path / "txt"
    txt.mkdir()
    for i in range(0, len(docs), 20):
        (txt / f"{i:04d}.txt").write_text("\n\n".join(docs[i:i + 20]))
    convert_text(str(txt), str(tmp_path / "text_one"), spec, files_per_group=100)  # one group: one stream
    for i in range(4):
        PieceJob("text", str(txt), str(tmp_path / "text_pieces"), spec, 4).run(i)
    merge(str(tmp_path / "text_pieces"), realign=True)
    assert shard_bytes(str(tmp_path / "text_pieces")) == shard_bytes(str(tmp_path / "text_one"))

    convert_json(jsonl, str(tmp_path / "json_one"), spec)
    convert_hf("json", str(tmp_path / "hf_one"), ["train"], spec, data_files={"train": jsonl})
    for i in range(3):
        PieceJob("hf", "json", str(tmp_path / "hf_pieces" / "train"), spec, 3,
                 hf={"split": "train", "data_files": {"train": jsonl}}).run(i)
    assert cli.main(["data-prep", "merge", "--out_root", str(tmp_path / "hf_pieces"), "--splits", "train", "--realign"]) == 0
    assert shard_bytes(str(tmp_path / "hf_pieces" / "train")) == shard_bytes(str(tmp_path / "hf_one" / "train"))

    for i in range(50):  # more pieces than rows: most hold a tail only, some nothing
        PieceJob("json", jsonl, str(tmp_path / "many"), spec, 50).run(i)
    merge(str(tmp_path / "many"), realign=True)
    assert shard_bytes(str(tmp_path / "many")) == shard_bytes(str(tmp_path / "json_one"))

    raw = TokenizeSpec()  # raw text: the pieces in order are the split
    convert_json(jsonl, str(tmp_path / "raw_one"), raw)
    for i in range(3):
        PieceJob("json", jsonl, str(tmp_path / "raw_pieces"), raw, 3).run(i)
    merge(str(tmp_path / "raw_pieces"))
    assert [r["text"] for r in LocalDataset(str(tmp_path / "raw_pieces"))] == docs


def test_piece_mistakes_are_clear_errors(tiny_tokenizer_dir, tmp_path, jsonl, capsys):
    base = ["data-prep", "json", "--path", jsonl, "--concat_tokens", str(ROW), "--tokenizer", tiny_tokenizer_dir]
    out = str(tmp_path / "out")
    cases = [
        (["--out_root", out, "--num_shards", "2", "--shard_index", "0", "--no_wrap"], "--no_wrap cannot be split"),
        (["--out_root", out, "--num_shards", "2", "--shard_index", "2"], "--shard_index must be 0 .. --num_shards - 1"),
        (["--out_root", out, "--shard_index", "1"], "--shard_index needs --num_shards"),
        (["--out_root", out, "--num_shards", "2"], "goes with --shard_index"),
        (["--out_root", out, "--num_shards", "2", "--shard_index", "0", "--realign"], "pass them to `data-prep merge`"),
        (["--out_root", "s3://bucket/x", "--num_shards", "2", "--shard_index", "0"], "a shared file system"),
        (["--out_root", out, "--realign"], "pass them to `data-prep merge`"),
        (["--out_root", out, "--num_workers", "-1"], "--num_workers (--processes) must be at least 1"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not os.path.exists(out)
    assert cli.main(base + ["--out_root", out, "--num_shards", "2", "--shard_index", "0"]) == 0
    assert cli.main(base + ["--out_root", out, "--num_shards", "3", "--shard_index", "0"]) == 2
    assert "pieces of another split into 2" in capsys.readouterr().err
    assert cli.main(base + ["--out_root", out, "--num_shards", "2", "--shard_index", "0", "--eos_text", EOS]) == 2
    assert "written with other settings" in capsys.readouterr().err
    assert cli.main(["data-prep", "merge", "--out_root", str(tmp_path / "nothing")]) == 2
    assert "write its pieces first" in capsys.readouterr().err
    os.makedirs(tmp_path / "foreign")
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    assert cli.main(base + ["--out_root", str(tmp_path / "foreign"), "--num_shards", "2", "--shard_index", "0"]) == 2
    assert "holds notes.txt, which no data-prep piece wrote" in capsys.readouterr().err
    zipped = str(tmp_path / "zipped")
    for i in range(2):
        assert cli.main(base + ["--out_root", zipped, "--num_shards", "2", "--shard_index", str(i), "--compression", "zstd"]) == 0
    assert cli.main(["data-prep", "merge", "--out_root", zipped, "--realign"]) == 2
    assert "needs them uncompressed" in capsys.readouterr().err
    assert cli.main(["data-prep", "merge", "--out_root", zipped]) == 0  # without --realign: fine
    shards = json.load(open(os.path.join(zipped, "index.json")))["shards"]
    assert {s["zip_data"]["basename"].split("/")[0] for s in shards} >= {"piece-00000-of-00002", "piece-00001-of-00002"}


def test_merge_publishes_to_an_object_store(bucket, tiny_tokenizer_dir, tmp_path, jsonl, capsys):
    """`merge --upload_to s3://...` (a real S3 server, moto): the merged split lands under the prefix with its
    index.json; a prefix holding someone else's objects is refused before the merge."""
    from llmfoundry_lite import stores
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=ROW, eos_text=EOS)
    for i in range(2):
        PieceJob("json", jsonl, str(tmp_path / "out" / "train"), spec, 2).run(i)
    stores.write_text(f"s3://{bucket}/taken/train/notes.txt", "mine")
    assert cli.main(["data-prep", "merge", "--out_root", str(tmp_path / "out"), "--splits", "train",
                     "--upload_to", f"s3://{bucket}/taken"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / "train" / "index.json")  # refused before merging
    assert cli.main(["data-prep", "merge", "--out_root", str(tmp_path / "out"), "--splits", "train",
                     "--upload_to", f"s3://{bucket}/data"]) == 0
    local = json.load(open(tmp_path / "out" / "train" / "index.json"))
    assert json.loads(stores.read_text(f"s3://{bucket}/data/train/index.json")) == local
    names = set(stores.names(f"s3://{bucket}/data/train"))
    assert {s["raw_data"]["basename"] for s in local["shards"]} <= names
