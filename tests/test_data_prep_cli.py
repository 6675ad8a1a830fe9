"""`llmfoundry-lite data-prep ...` and the llm-foundry-named `data_prep/*.py` scripts: every sub-command
writes what it says, reports it, and turns bad input into exit code 2 with a message naming the problem."""
import json
import os
import subprocess
import sys

import pytest

from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.prep.command import parse_data_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = "<|endoftext|>"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _samples(folder):
    with open(os.path.join(folder, "index.json")) as f:
        return sum(s["samples"] for s in json.load(f)["shards"])


def test_parse_data_files():
    assert parse_data_files(None) is None
    assert parse_data_files(["a.jsonl", "b.jsonl"]) == ["a.jsonl", "b.jsonl"]
    assert parse_data_files(["train=a.jsonl", "val=b.jsonl"]) == {"train": "a.jsonl", "val": "b.jsonl"}
    with pytest.raises(UserError, match="split=path for every entry"):
        parse_data_files(["train=a.jsonl", "b.jsonl"])


def test_train_tokenizer_then_json_hf_and_text(tmp_path, capsys):
    from conftest import stdlib_docstrings
    text = stdlib_docstrings(60_000)
    (tmp_path / "corpus.txt").write_text(text)
    tok = str(tmp_path / "tok")
    assert main(["data-prep", "train-tokenizer", str(tmp_path / "corpus.txt"), "--out", tok, "--vocab_size", "320"]) == 0
    assert "320 tokens" in capsys.readouterr().out
    docs = [p for p in text.split("\n\n") if p.strip()][:80]
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    token_flags = ["--concat_tokens", "32", "--tokenizer", tok, "--eos_text", EOS]

    assert main(["data-prep", "json", "--path", src, "--out_root", str(tmp_path / "js"), "--split", "train",
                 *token_flags]) == 0
    out = capsys.readouterr().out
    assert "80 documents ->" in out and "dropped: " in out and "tokens/s" in out
    assert main(["data-prep", "hf", "--dataset", "json", "--data_files", f"train={src}", f"val={src}",
                 "--splits", "train", "val", "--out_root", str(tmp_path / "hf"), *token_flags]) == 0
    # the same documents through `datasets` give the same rows as our own JSONL reader
    assert _samples(tmp_path / "hf" / "train") == _samples(tmp_path / "hf" / "val") == _samples(tmp_path / "js" / "train")

    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(docs[:6]):
        (txt / f"{i}.txt").write_text(d)
    args = ["data-prep", "text", "--input_folder", str(txt), "--output_folder", str(tmp_path / "tx")]
    assert main(args) == 0 and _samples(tmp_path / "tx") == 6  # raw text: one sample per file
    capsys.readouterr()
    assert main(args) == 0 and "already converted" in capsys.readouterr().out


def test_finetuning_local_file_and_builder(tmp_path, tiny_tokenizer_dir, capsys):
    rows = [{"prompt": "What is 2+2?", "response": "4"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
            {"prompt": "", "response": "empty prompt"}]
    src = _jsonl(tmp_path / "ft.jsonl", rows)
    assert main(["data-prep", "finetuning", "--dataset", src, "--splits", "train", "--out_root", str(tmp_path / "a"),
                 "--tokenizer", tiny_tokenizer_dir, "--max_seq_len", "64"]) == 0
    out = capsys.readouterr().out
    assert "3 examples, 2 written" in out and "1 dropped empty" in out
    assert _samples(tmp_path / "a" / "train") == 2
    assert main(["data-prep", "finetuning", "--dataset", "json", "--data_files", src, "--splits", "train",
                 "--out_root", str(tmp_path / "b")]) == 0
    assert _samples(tmp_path / "b" / "train") == 2
    # without a tokenizer a chat is rendered by the template alone, exactly as the tokenizer renders it
    from transformers import AutoTokenizer

    from llmfoundry_lite.data.finetuning import to_turns
    assert to_turns(rows[1], None) == to_turns(rows[1], AutoTokenizer.from_pretrained(tiny_tokenizer_dir))


def test_finetuning_bad_lines_are_named_or_counted(tmp_path, tiny_tokenizer_dir, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops\n{"instruction": "x"}\n')
    base = ["data-prep", "finetuning", "--dataset", str(src), "--splits", "train"]
    assert main(base + ["--out_root", str(tmp_path / "o1")]) == 2
    assert f"{src}:2: malformed JSON" in capsys.readouterr().err
    src.write_text('{"prompt": "a", "response": "b"}\n{"instruction": "x"}\n')
    assert main(base + ["--out_root", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and "expected prompt/response or messages" in err
    src.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops\n{"instruction": "x"}\n')
    assert main(base + ["--out_root", str(tmp_path / "o3"), "--skip_bad_lines"]) == 0
    out = capsys.readouterr().out
    assert "1 written" in out and "1 malformed lines" in out and "1 skipped invalid" in out
    src.write_text('{"instruction": "x"}\n')  # everything skipped: nothing to train on is an error
    assert main(base + ["--out_root", str(tmp_path / "o5"), "--skip_bad_lines"]) == 2
    assert "no usable examples" in capsys.readouterr().err and not (tmp_path / "o5" / "train").exists()
    assert main(base + ["--out_root", str(tmp_path / "o4"), "--max_seq_len", "8"]) == 2
    assert "--max_seq_len needs --tokenizer" in capsys.readouterr().err


def test_scripts_take_llm_foundry_flags(tmp_path, tiny_tokenizer_dir):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "some words to tokenize " * 20}] * 4)
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep", "convert_dataset_json.py"), "--path", src,
                           "--out_root", str(tmp_path / "out"), "--split", "train", "--concat_tokens", "16",
                           "--tokenizer", tiny_tokenizer_dir, "--eos_text", EOS, "--compression", "zstd"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(tmp_path / "out" / "train" / "shard.00000.mds.zstd")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "data_prep", "convert_dataset_hf.py"), "--dataset", "json",
                           "--data_files", str(tmp_path / "missing.jsonl"), "--splits", "train",
                           "--out_root", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error: cannot load dataset 'json'" in proc.stderr
    assert "Traceback" not in proc.stderr
