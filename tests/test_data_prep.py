"""Data prep: tokenizers, documents -> MDS shards -> batches, and every bad-input error."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import stdlib_docstrings
from transformers import AutoTokenizer

from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.data.text_dataset import StreamingTextDataset
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.prep.convert import TokenizeSpec, convert_json, convert_text

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def docs():
    return [d for d in stdlib_docstrings(60_000).split("\n\n") if d.strip()][:120]


def write_jsonl(path, docs, key="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({key: d}) + "\n")
    return str(path)


def expected_rows(tok, docs, n, wrap=True):
    """Independent truth: tokenize each document, add EOS, concatenate, cut into rows of n."""
    stream, rows = [], []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        while len(stream) >= n:
            rows.append(stream[:n])
            stream = stream[n:] if wrap else []
    return rows


def test_trained_tokenizer_loads_with_auto_and_has_chatml(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert len(tok) == 400 and tok.eos_token == EOS and tok.pad_token == EOS
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("Return the path.")["input_ids"]
    assert tok.decode(ids) == "Return the path."


def test_build_tokenizer_errors(tiny_tokenizer_dir, tmp_path):
    tok = build_tokenizer(tiny_tokenizer_dir, {"model_max_length": 32, "padding_side": "left"})
    assert tok.model_max_length == 32 and tok.padding_side == "left" and tok.pad_token_id == tok.eos_token_id
    with pytest.raises(UserError, match="cannot load"):
        build_tokenizer(str(tmp_path / "missing"))
    # a tokenizer without EOS
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path / "noeos")
    with pytest.raises(UserError, match="no EOS token"):
        build_tokenizer(str(tmp_path / "noeos"))


def test_jsonl_round_trip_gives_exact_token_stream(tiny_tokenizer_dir, tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs)
    summary = convert_json(src, str(tmp_path / "mds"), TokenizeSpec(tiny_tokenizer_dir, concat_tokens=16, eos_text=EOS))
    tok = build_tokenizer(tiny_tokenizer_dir)
    rows = expected_rows(tok, docs, 16)
    assert summary.samples == len(rows) and summary.tokens == 16 * len(rows) and summary.documents == len(docs)
    all_tokens = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert summary.dropped == {"tokens in the last partial row": all_tokens - 16 * len(rows)}
    index = json.load(open(tmp_path / "mds" / "index.json"))
    assert index["shards"][0]["column_encodings"] == ["ndarray:uint16"]  # vocab 400 fits in 16 bits
    loader = build_dataloader({"name": "text", "dataset": {"local": str(tmp_path / "mds"), "max_seq_len": 16}},
                              tok, device_batch_size=4)
    got = torch.cat([b["input_ids"] for b in loader]).tolist()
    assert got == rows
    batch = next(iter(loader))
    assert batch["labels"].tolist() == batch["input_ids"].tolist() and batch["attention_mask"].all()


def test_no_wrap_and_raw_text_shards(tiny_tokenizer_dir, tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs[:30])
    s = convert_json(src, str(tmp_path / "nw"), TokenizeSpec(tiny_tokenizer_dir, concat_tokens=16, eos_text=EOS, wrap=False))
    tok = build_tokenizer(tiny_tokenizer_dir)
    ds = StreamingTextDataset(tok, 16, local=str(tmp_path / "nw"))
    assert [ds[i].tolist() for i in range(len(ds))] == expected_rows(tok, docs[:30], 16, wrap=False)
    assert s.dropped["tokens after a row cut (--no_wrap)"] > 0
    # without --concat_tokens: raw text, tokenized by the loader and padded to max_seq_len
    convert_json(src, str(tmp_path / "txt"), TokenizeSpec())
    loader = build_dataloader({"name": "text", "dataset": {"local": str(tmp_path / "txt"), "max_seq_len": 24}},
                              tok, device_batch_size=30)
    batch = next(iter(loader))
    for i, d in enumerate(docs[:30]):
        ids = tok(d)["input_ids"][:24]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["attention_mask"][i].sum() == len(ids)
        assert (batch["labels"][i, len(ids):] == -100).all()


def test_reads_llm_foundry_int32_bytes_layout(tiny_tokenizer_dir, tmp_path):
    from streaming import MDSWriter
    rows = np.arange(5 * 8, dtype=np.int32).reshape(5, 8) + 300
    with MDSWriter(out=str(tmp_path / "lf"), columns={"tokens": "bytes"}) as w:
        for r in rows:
            w.write({"tokens": r.tobytes()})
    tok = build_tokenizer(tiny_tokenizer_dir)
    ds = StreamingTextDataset(tok, 8, local=str(tmp_path / "lf"))
    assert torch.stack([ds[i] for i in range(5)]).tolist() == rows.tolist()
    with MDSWriter(out=str(tmp_path / "odd"), columns={"tokens": "bytes"}) as w:
        w.write({"tokens": np.arange(3, dtype=np.int32).tobytes()})
    ds64 = StreamingTextDataset(tok, 8, token_encoding_type="int64", local=str(tmp_path / "odd"))
    with pytest.raises(DataError, match="token_encoding_type"):
        ds64[0]


def test_text_folder_conversion_resumes(tiny_tokenizer_dir, tmp_path, docs):
    src = tmp_path / "txt"
    src.mkdir()
    for i, d in enumerate(docs[:12]):
        (src / f"{i:02d}.txt").write_text(d)
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=16, eos_text=EOS)
    out = tmp_path / "out"
    first = convert_text(str(src), str(out), spec, files_per_group=4)
    assert sorted(os.listdir(out)) == [".done", ".llmfoundry_lite.json", "group_00000", "group_00001", "group_00002", "index.json", "plan.json"]
    tok = build_tokenizer(tiny_tokenizer_dir)
    expected = sum((expected_rows(tok, docs[g:g + 4], 16) for g in (0, 4, 8)), [])
    ds = StreamingTextDataset(tok, 16, local=str(out))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    # simulate a crash in group 1: no done marker at top level nor in that group, partial shards left
    os.remove(out / ".done")
    os.remove(out / "group_00001" / ".done")
    mtime0 = os.path.getmtime(out / "group_00000" / "index.json")
    again = convert_text(str(src), str(out), spec, files_per_group=4)
    assert os.path.getmtime(out / "group_00000" / "index.json") == mtime0  # finished work is skipped
    assert (again.samples, again.tokens) == (first.samples, first.tokens)
    ds = StreamingTextDataset(tok, 16, local=str(out))
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    with pytest.raises(UserError, match="other settings"):
        convert_text(str(src), str(out), TokenizeSpec(tiny_tokenizer_dir, concat_tokens=8))


def test_bad_inputs_give_clear_errors(tiny_tokenizer_dir, tmp_path):
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=8, eos_text=EOS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine line of text"}\n{"text": broken\n{"text": "another fine line"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON.*--skip_bad_lines"):
        convert_json(str(bad), str(tmp_path / "o1"), spec)
    s = convert_json(str(bad), str(tmp_path / "o2"), spec, skip_bad_lines=True)
    assert s.documents == 2 and s.dropped["malformed lines"] == 1
    with pytest.raises(UserError, match="not empty"):
        convert_json(str(bad), str(tmp_path / "o2"), spec, skip_bad_lines=True)
    with pytest.raises(DataError, match="no 'body' field"):
        convert_json(str(bad), str(tmp_path / "o3"), spec, text_column="body", skip_bad_lines=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        convert_json(str(empty), str(tmp_path / "o4"), spec)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": "  "}\n{"text": "words here"}\n')
    assert convert_json(str(blank), str(tmp_path / "o5"), spec).dropped["empty documents"] == 1
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        convert_json(str(latin), str(tmp_path / "o6"), spec)
    with pytest.raises(UserError, match="go together"):
        convert_json(str(blank), str(tmp_path / "o7"), TokenizeSpec(tiny_tokenizer_dir))
    with pytest.raises(UserError, match="not found"):
        convert_json(str(tmp_path / "nope.jsonl"), str(tmp_path / "o8"), spec)


def test_missing_column_in_hf_dataset(tiny_tokenizer_dir, tmp_path):
    from llmfoundry_lite.prep.convert import convert_hf
    src = write_jsonl(tmp_path / "d.jsonl", ["some text", "more text"], key="content")
    with pytest.raises(DataError, match=r"no column 'text'.*content"):
        convert_hf("json", str(tmp_path / "out"), ["train"], TokenizeSpec(), data_files=src)
    out = convert_hf("json", str(tmp_path / "out2"), ["train"], TokenizeSpec(), data_files=src, text_column="content")
    assert out["train"].samples == 2 and os.path.isfile(tmp_path / "out2" / "train" / "index.json")


@pytest.mark.multiprocess
def test_parallel_tokenization_gives_identical_shards(tiny_tokenizer_dir, tmp_path, docs):
    src = write_jsonl(tmp_path / "in.jsonl", docs * 3)
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=16, eos_text=EOS)
    one = convert_json(src, str(tmp_path / "w1"), spec, num_workers=1)
    two = convert_json(src, str(tmp_path / "w2"), spec, num_workers=2)
    assert (one.samples, one.tokens) == (two.samples, two.tokens)
    assert (tmp_path / "w1" / "shard.00000.mds").read_bytes() == (tmp_path / "w2" / "shard.00000.mds").read_bytes()


def test_tokenizer_truncation_setting_is_off_as_in_tok_call(tiny_tokenizer_dir, tmp_path, docs):
    """Data prep encodes with the Rust tokenizer directly; a tokenizer.json that truncates (or pads) must
    still give every token, as `tok(texts)` does (it turns both off), and TOKENIZERS_PARALLELISM is put back."""
    import shutil

    from tokenizers import Tokenizer
    folder = tmp_path / "truncating"
    shutil.copytree(tiny_tokenizer_dir, folder)
    backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backend.enable_truncation(5)
    backend.enable_padding(length=7)
    backend.save(str(folder / "tokenizer.json"))
    tok = build_tokenizer(str(folder))
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        out = tmp_path / "out"
        convert_json(write_jsonl(tmp_path / "in.jsonl", docs[:40]), str(out), TokenizeSpec(str(folder), concat_tokens=16))
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    finally:
        del os.environ["TOKENIZERS_PARALLELISM"]
    ds = StreamingTextDataset(tokenizer=tok, local=str(out), max_seq_len=16, shuffle=False)
    stream = sum((tok(d, add_special_tokens=False)["input_ids"] for d in docs[:40]), [])  # no bos/eos here
    assert [ds[i].tolist() for i in range(len(ds))] == [stream[i:i + 16] for i in range(0, len(stream) - 15, 16)]
