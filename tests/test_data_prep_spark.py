"""Data prep on a real local Spark (PySpark 4, local[2]): the CLI's `--spark` and `dataframe_to_mds`,
against the one-machine run. Spark needs Java 17+; where it is missing the session fixture fails
saying how to install it (CI never skips this)."""
import json
import os

import numpy as np
import pytest
from conftest import stdlib_docstrings
from streaming import LocalDataset

from llmfoundry_lite import cli
from llmfoundry_lite.prep.convert import TokenizeSpec, convert_json
from llmfoundry_lite.prep.spark import dataframe_to_mds, session

EOS = "<|endoftext|>"
ROW = 16


@pytest.fixture(scope="module")
def spark():
    spark = session("local[2]")  # a UserError naming the Java install when there is no Java
    yield spark
    spark.stop()


@pytest.fixture(scope="module")
def docs():
    return [d for d in stdlib_docstrings(80_000).split("\n\n") if d.strip()][:200]


@pytest.fixture(scope="module")
def one_machine(tiny_tokenizer_dir, tmp_path_factory, docs):
    root = tmp_path_factory.mktemp("spark_one")
    (root / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    spec = TokenizeSpec(tiny_tokenizer_dir, concat_tokens=ROW, eos_text=EOS)
    summary = convert_json(str(root / "in.jsonl"), str(root / "one"), spec)
    return root, spec, summary


def shard_bytes(folder):
    index = json.load(open(os.path.join(folder, "index.json")))
    return [open(os.path.join(folder, s["raw_data"]["basename"]), "rb").read() for s in index["shards"]]


def all_tokens(folder):
    ds = LocalDataset(folder)
    return np.sort(np.concatenate([ds[i]["tokens"] for i in range(len(ds))]))


def test_cli_spark_job_realigned_is_the_one_machine_output(spark, tiny_tokenizer_dir, one_machine, tmp_path, capsys):
    root, _, _ = one_machine
    out = str(tmp_path / "spark")
    assert cli.main(["data-prep", "json", "--path", str(root / "in.jsonl"), "--out_root", out, "--concat_tokens", str(ROW),
                     "--tokenizer", tiny_tokenizer_dir, "--eos_text", EOS, "--spark", "local[2]", "--num_shards", "3",
                     "--realign"]) == 0
    assert shard_bytes(out) == shard_bytes(str(root / "one"))

    bad = tmp_path / "bad.jsonl"
    bad.write_text((root / "in.jsonl").read_text() + "{not json\n")
    assert cli.main(["data-prep", "json", "--path", str(bad), "--out_root", str(tmp_path / "bad"), "--concat_tokens",
                     str(ROW), "--tokenizer", tiny_tokenizer_dir, "--spark", "local[2]", "--num_shards", "3"]) == 2
    err = capsys.readouterr().err
    assert "a Spark task failed, so nothing was merged" in err and "malformed JSON" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "bad" / "index.json")


def test_dataframe_partitions_become_pieces(spark, one_machine, tmp_path, docs):
    root, spec, summary = one_machine
    df = spark.sparkContext.parallelize([(d,) for d in docs], 3).toDF(["text"])
    merged = dataframe_to_mds(df, str(tmp_path / "df"), spec)
    assert (merged.documents, merged.samples, merged.tokens, merged.dropped) == (
        summary.documents, summary.samples, summary.tokens, summary.dropped)
    assert np.array_equal(all_tokens(str(tmp_path / "df")), all_tokens(str(root / "one")))
    dataframe_to_mds(df, str(tmp_path / "df_realigned"), spec, realign=True)
    assert shard_bytes(str(tmp_path / "df_realigned")) == shard_bytes(str(root / "one"))
