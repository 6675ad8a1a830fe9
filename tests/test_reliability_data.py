"""Bad data gives a clear error naming the problem, or a counted skip, never silent loss or garbage:
binary and undecodable files, huge lines, malformed lines inside `datasets` builders, truncated and
corrupted MDS shards, and shards written with another tokenizer."""
import json

import numpy as np
import pytest

from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.prep.convert import TokenizeSpec, convert_hf, convert_json

EOS = "<|endoftext|>"


def _spec(tokenizer_dir):
    return TokenizeSpec(tokenizer_dir, concat_tokens=16, eos_text=EOS)


def test_binary_file_is_named_or_counted(tiny_tokenizer_dir, tmp_path):
    src = tmp_path / "blob.jsonl"
    rng = np.random.default_rng(0)
    src.write_bytes(b'{"text": "a good line of text"}\n' + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() + b"\n")
    with pytest.raises(DataError, match=r"blob.jsonl:2: (not UTF-8|malformed JSON)"):
        convert_json(str(src), str(tmp_path / "o1"), _spec(tiny_tokenizer_dir))
    summary = convert_json(str(src), str(tmp_path / "o2"), _spec(tiny_tokenizer_dir), skip_bad_lines=True)
    assert summary.documents == 1 and sum(summary.dropped.get(k, 0) for k in ("undecodable lines", "malformed lines")) >= 1


def test_huge_line_is_converted_whole(tiny_tokenizer_dir, tmp_path, tok):
    text = "Return the number of items in the container. " * 20_000  # ~0.9 MB in one JSONL line
    src = tmp_path / "huge.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    summary = convert_json(str(src), str(tmp_path / "out"), _spec(tiny_tokenizer_dir))
    expected = len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert summary.tokens + summary.dropped.get("tokens in the last partial row", 0) == expected


def test_malformed_line_inside_a_datasets_builder(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "fine"}\n{"text": nope}\n')
    with pytest.raises(DataError, match=r"cannot load dataset 'json' split 'train'"):
        convert_hf("json", str(tmp_path / "out"), ["train"], TokenizeSpec(), data_files=str(src))


@pytest.fixture
def shards(tiny_tokenizer_dir, tmp_path):
    docs = [{"text": f"Document {i}: return the sum of the items in the list, or zero."} for i in range(60)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    convert_json(str(src), str(tmp_path / "mds"), _spec(tiny_tokenizer_dir))
    shard = tmp_path / "mds" / "shard.00000.mds"
    assert json.load(open(tmp_path / "mds" / "index.json"))["shards"][0]["raw_data"]["hashes"]  # written with xxh64
    return str(tmp_path / "mds"), shard


def _loader(local, tok, **dataset):
    return build_dataloader({"name": "text", "dataset": {"local": local, "max_seq_len": 16, **dataset}}, tok, 4)


def test_truncated_shard_is_refused_at_start(shards, tok):
    local, shard = shards
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError, match=r"shard.00000.mds has \d+ bytes but its index.json says \d+: it is truncated"):
        _loader(local, tok)


def test_corrupted_shard_is_caught_by_its_hash(shards, tok):
    local, shard = shards
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0xFF  # one flipped byte inside a token row: same size, wrong content
    shard.write_bytes(bytes(data))
    _loader(local, tok)  # without validate_hash only sizes are checked (a stat per shard)
    with pytest.raises(DataError, match=r"shard.00000.mds is corrupted: its xxh64 hash differs"):
        _loader(local, tok, validate_hash="xxh64")
    with pytest.raises(DataError, match=r"validate_hash: 'sha1', but the shards .* carry \['xxh64'\]"):
        _loader(local, tok, validate_hash="sha1")


def test_shards_of_another_tokenizer_are_refused(tmp_path, tok):
    from streaming import MDSWriter
    with MDSWriter(out=str(tmp_path / "big"), columns={"tokens": "ndarray:int32"}) as w:
        for i in range(8):
            w.write({"tokens": np.arange(i * 16, i * 16 + 16, dtype=np.int32) + 300})  # ids up to 427 >= 400
    batches = iter(_loader(str(tmp_path / "big"), tok))
    with pytest.raises(DataError, match=r"token id \d+, outside the tokenizer's vocabulary of \d+: the shards were "
                                        r"written with another tokenizer"):
        next(batches)
        next(batches)
