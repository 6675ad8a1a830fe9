"""Object stores (issue 26) against a real S3 server (moto, `s3_server`/`bucket` in conftest.py): every
user-facing command reads and writes `s3://` as it does local paths, writes so that a reader never sees
half an output (index.json / config.json last), refuses a prefix it did not write, and turns a wrong
endpoint, bucket or key into exit code 2 within seconds with a message naming the URI."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from llmfoundry_lite import stores
from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.errors import StoreError
from llmfoundry_lite.export.composer_checkpoint import POINTER

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
EOS = "<|endoftext|>"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Downloads and staging in the test's folder, never ~/.cache."""
    monkeypatch.setenv("LLMFOUNDRY_LITE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_tokenizer_dir):
    """A full (.pt) and a sharded (DCP) Composer checkpoint of the same tiny run (tests/export_checkpoints.py)."""
    out = tmp_path_factory.mktemp("composer_ckpts")
    subprocess.run([sys.executable, os.path.join(HERE, "export_checkpoints.py"), str(out), tiny_tokenizer_dir],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    return {"full": str(out / "full" / "ep0-ba3-rank0.pt"), "sharded": str(out / "sharded" / "ep0-ba3")}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _docs(n=60):
    from conftest import stdlib_docstrings
    return [p for p in stdlib_docstrings(40_000).split("\n\n") if p.strip()][:n]


def _tree(folder):
    """{relative path: bytes} of every file under `folder` but our manifest."""
    return {n: open(os.path.join(folder, n), "rb").read() for n in stores.files_under(folder)
            if n != ".llmfoundry_lite.json"}


def _timed_exit_2(argv, capsys, uri):
    start = time.monotonic()
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30, argv
    assert uri in err and "Traceback" not in err, err
    return err


# ---- data prep ----------------------------------------------------------------------------------

def test_data_prep_to_s3_equals_local_and_reruns_replace_only_its_own(bucket, tiny_tokenizer_dir, tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in _docs()])
    flags = ["--concat_tokens", "32", "--tokenizer", tiny_tokenizer_dir, "--eos_text", EOS]
    uri = f"s3://{bucket}/data"
    assert cli(["data-prep", "json", "--path", src, "--out_root", str(tmp_path / "local"), "--split", "train", *flags]) == 0
    assert cli(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "train", *flags]) == 0
    assert f"{uri}/train: 60 documents" in capsys.readouterr().out
    assert {"index.json", ".llmfoundry_lite.json"} <= set(stores.names(f"{uri}/train"))
    back = stores.download_folder(f"{uri}/train", str(tmp_path / "back"))
    assert _tree(back) == _tree(tmp_path / "local" / "train")  # the same shards and index, byte for byte

    # a re-run replaces what data prep wrote there; a prefix holding anything else is refused, before any work
    assert cli(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "train", *flags]) == 0
    stores.write_text(f"{uri}/val/notes.txt", "mine")
    err = _timed_exit_2(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "val", *flags], capsys,
                        f"{uri}/val")
    assert "notes.txt" in err and "--overwrite" in err
    assert stores.names(f"{uri}/val") == ["notes.txt"]
    assert cli(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "val", "--overwrite", *flags]) == 0
    assert {"index.json", "notes.txt"} <= set(stores.names(f"{uri}/val"))  # other objects are kept


def test_finetuning_data_prep_to_s3(bucket, tmp_path, capsys):
    rows = [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)]
    src = _jsonl(tmp_path / "ft.jsonl", rows)
    uri = f"s3://{bucket}/ft"
    assert cli(["data-prep", "finetuning", "--dataset", src, "--splits", "train", "--out_root", uri]) == 0
    assert f"{uri}/train: " in capsys.readouterr().out
    index = json.loads(stores.read_text(f"{uri}/train/index.json"))
    assert sum(s["samples"] for s in index["shards"]) == 20


def test_tokenizer_and_text_data_prep_to_s3(bucket, tmp_path, capsys):
    from conftest import stdlib_docstrings
    (tmp_path / "corpus.txt").write_text(stdlib_docstrings(30_000))
    tok = f"s3://{bucket}/tok"
    assert cli(["data-prep", "train-tokenizer", str(tmp_path / "corpus.txt"), "--out", tok, "--vocab_size", "300"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", ".llmfoundry_lite.json"} <= set(stores.names(tok))
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, d in enumerate(_docs(6)):
        (txt / f"{i}.txt").write_text(d)
    out = f"s3://{bucket}/text"
    assert cli(["data-prep", "text", "--input_folder", str(txt), "--output_folder", out, "--concat_tokens", "16",
                "--tokenizer", tok]) == 0  # the tokenizer read from the bucket too
    assert f"{out}: 6 documents" in capsys.readouterr().out
    index = json.loads(stores.read_text(f"{out}/index.json"))
    assert all(name in stores.names(out) for s in index["shards"] for name in [s["raw_data"]["basename"]])


def test_failed_data_prep_leaves_no_index_json(bucket, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    docs = _docs()
    flags = ["--concat_tokens", "32", "--tokenizer", tiny_tokenizer_dir]
    uri = f"s3://{bucket}/data"
    bad = tmp_path / "bad.jsonl"  # a malformed line after 50 good documents
    bad.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:50]) + "{not json\n")
    assert cli(["data-prep", "json", "--path", str(bad), "--out_root", uri, "--split", "train", *flags]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert stores.names(uri) == []

    # the upload itself fails after the shards: index.json, uploaded last, is not there
    real_upload = stores.upload

    def failing(path, target):
        if target.endswith("/index.json"):
            raise StoreError(f"{target}: upload failed: connection reset (injected)")
        real_upload(path, target)
    monkeypatch.setattr(stores, "upload", failing)
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    assert cli(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "train",
                "--compression", "zstd", *flags]) == 2
    assert "injected" in capsys.readouterr().err
    present = stores.names(f"{uri}/train")
    assert "index.json" not in present and any(n.endswith(".mds.zstd") for n in present)
    monkeypatch.setattr(stores, "upload", real_upload)
    # the next run recognises the half-uploaded split as its own and completes it
    assert cli(["data-prep", "json", "--path", src, "--out_root", uri, "--split", "train", *flags]) == 0
    present = stores.names(f"{uri}/train")
    assert "index.json" in present and not any(n.endswith(".zstd") for n in present)  # the stale shards are gone


# ---- convert -------------------------------------------------------------------------------------

def _weights(folder):
    from safetensors.torch import load_file
    return {k: v for f in sorted(os.listdir(folder)) if f.endswith(".safetensors")
            for k, v in load_file(os.path.join(folder, f)).items()}


@pytest.mark.parametrize("kind", ["full", "sharded"])
def test_convert_from_and_to_s3_equals_local(kind, checkpoints, bucket, tmp_path, monkeypatch):
    local = tmp_path / "local_hf"
    assert cli(["convert", "--composer_path", checkpoints[kind], "--hf_output_path", str(local),
                "--max_shard_size", "40KB"]) == 0
    run = f"s3://{bucket}/run"  # a save_folder: the checkpoint and the pointer object naming it
    name = os.path.basename(checkpoints[kind])
    if kind == "full":
        stores.upload(checkpoints[kind], f"{run}/{name}")
    else:
        stores.upload_folder(checkpoints[kind], f"{run}/{name}", last=[".metadata"])
    stores.write_text(f"{run}/{POINTER}", f"run/{name}")

    uploads = []
    real_upload = stores.upload
    monkeypatch.setattr(stores, "upload", lambda path, uri: (uploads.append(uri), real_upload(path, uri)))
    out = f"s3://{bucket}/hf"
    for source in (f"{run}/{name}", run):  # the checkpoint itself, and the save_folder's latest
        assert cli(["convert", "--composer_path", source, "--hf_output_path", out, "--max_shard_size", "40KB"]) == 0
    files = [u for u in uploads if not u.endswith(".llmfoundry_lite.json")]
    assert files[-1] == f"{out}/config.json" and len(files) > 4  # config.json last, after the shards
    back = stores.download_folder(out, str(tmp_path / "back"))
    assert set(_tree(back)) == set(_tree(local))
    theirs, ours = _weights(back), _weights(local)
    assert theirs.keys() == ours.keys()
    for key, tensor in ours.items():
        torch.testing.assert_close(theirs[key], tensor, rtol=0, atol=0)


def test_convert_refuses_a_foreign_prefix(checkpoints, bucket, capsys):
    out = f"s3://{bucket}/models/mine"
    stores.write_text(f"{out}/README.md", "my model card")
    err = _timed_exit_2(["convert", "--composer_path", checkpoints["full"], "--hf_output_path", out], capsys, out)
    assert "README.md" in err and "--overwrite" in err
    assert stores.names(out) == ["README.md"]  # nothing was written
    assert cli(["convert", "--composer_path", checkpoints["full"], "--hf_output_path", out, "--overwrite"]) == 0
    assert {"README.md", "config.json", "model.safetensors"} <= set(stores.names(out))


def test_gguf_from_and_to_s3_equals_local(checkpoints, bucket, tmp_path, capsys):
    local = tmp_path / "m.gguf"
    assert cli(["convert", "--composer_path", checkpoints["sharded"], "--gguf_output_path", str(local)]) == 0
    source = f"s3://{bucket}/ckpt"
    stores.upload_folder(checkpoints["sharded"], source, last=[".metadata"])
    out = f"s3://{bucket}/models/m.gguf"
    assert cli(["convert", "--composer_path", source, "--gguf_output_path", out]) == 0
    back = stores.download(out, str(tmp_path / "back" / "m.gguf"))
    assert open(back, "rb").read() == local.read_bytes()
    err = _timed_exit_2(["convert", "--composer_path", source, "--gguf_output_path", out], capsys, out)
    assert "exists" in err and "--overwrite" in err
    assert cli(["convert", "--composer_path", source, "--gguf_output_path", out, "--overwrite"]) == 0


def test_hf_checkpointer_uploads_each_folder_config_json_last(bucket, tiny_tokenizer_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from composer.core import Event
    from transformers import AutoTokenizer

    from llmfoundry_lite.errors import UserError
    from llmfoundry_lite.export.hf_export import write_hf_folder
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    from llmfoundry_lite.training.callbacks import HFCheckpointer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tokenizer)))
    state = SimpleNamespace(model=SimpleNamespace(model=model, tokenizer=tokenizer),
                            timestamp=SimpleNamespace(batch=SimpleNamespace(value=4)))
    save_folder = f"s3://{bucket}/run/hf"
    stores.write_text(f"{save_folder}/ba2/notes.txt", "not an export")  # a ba folder of someone else's
    with pytest.raises(UserError, match=f"{save_folder}/ba2: holds notes.txt.*hf_checkpointer.overwrite"):
        HFCheckpointer(save_folder).run_event(Event.INIT, state, None)
    stores.delete(f"{save_folder}/ba2/notes.txt")

    uploads = []
    real_upload = stores.upload
    monkeypatch.setattr(stores, "upload", lambda path, uri: (uploads.append(uri), real_upload(path, uri)))
    callback = HFCheckpointer(save_folder, save_interval="2ba")
    callback.run_event(Event.INIT, state, None)
    callback.save(state)
    files = [u for u in uploads if not u.endswith(".llmfoundry_lite.json")]
    assert files[-1] == f"{save_folder}/ba4/config.json"
    local = write_hf_folder(model.config, model.state_dict(), tmp_path / "local", tokenizer, log=lambda m: None)
    back = stores.download_folder(f"{save_folder}/ba4", str(tmp_path / "back"))
    assert set(_tree(back)) == set(_tree(local))
    for key, tensor in _weights(local).items():
        torch.testing.assert_close(_weights(back)[key], tensor, rtol=0, atol=0)


# ---- generate, eval ------------------------------------------------------------------------------

def test_generate_from_s3_equals_local(bucket, tiny_tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from llmfoundry_lite.export.hf_export import write_hf_folder
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tokenizer)))
    folder = tmp_path / "model"
    write_hf_folder(model.config, model.state_dict(), folder, tokenizer, log=lambda m: None)
    uri = f"s3://{bucket}/models/tiny"
    stores.upload_folder(str(folder), uri, last=["config.json"])
    flags = ["--prompts", "Return a new", "The", "--max_new_tokens", "8", "--device", "cpu", "--seed", "1"]
    outputs = []
    for source in (str(folder), uri):
        assert cli(["generate", source, *flags]) == 0
        outputs.append([line for line in capsys.readouterr().out.splitlines() if "tokens/s" not in line])
    assert outputs[0] == outputs[1] and outputs[0]


def test_eval_load_path_from_s3_equals_local(checkpoints, bucket, tmp_path):
    from llmfoundry_lite.eval.runner import evaluate

    task = _jsonl(tmp_path / "mc.jsonl", [{"query": f"The {w} is", "choices": ["red", "blue"], "gold": i % 2}
                                          for i, w in enumerate(["door", "sky", "apple", "sea"])])
    uri = f"s3://{bucket}/ckpts/{os.path.basename(checkpoints['full'])}"
    stores.upload(checkpoints["full"], uri)
    results = [evaluate({"max_seq_len": 64, "device_eval_batch_size": 4, "device": "cpu", "progress_bar": False,
                         "results_path": None, "load_path": path, "icl_tasks": [{"label": "mc", "dataset_uri": task,
                                                           "icl_task_type": "multiple_choice", "num_fewshot": [0]}]})
               for path in (checkpoints["full"], uri)]
    assert results[0] == results[1]


# ---- fast, clear failures ------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["wrong endpoint", "missing bucket", "missing key"])
def test_unreachable_or_missing_is_exit_2_within_seconds_naming_the_uri(case, bucket, checkpoints, tiny_tokenizer_dir,
                                                                         tmp_path, capsys, monkeypatch):
    if case == "wrong endpoint":
        monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    name = "no-such-bucket-llmf" if case == "missing bucket" else bucket
    base = f"s3://{name}/nothing/here"
    src = _jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    for argv, uri in [
        (["generate", base, "--prompts", "x", "--device", "cpu"], base),
        (["chat", base, "--device", "cpu"], base),
        (["convert", "--composer_path", f"{base}/ep0-ba3-rank0.pt", "--hf_output_path", str(tmp_path / "hf")],
         f"{base}/ep0-ba3-rank0.pt"),
    ]:
        err = _timed_exit_2(argv, capsys, uri)
        assert {"wrong endpoint": "S3_ENDPOINT_URL", "missing bucket": "bucket",
                "missing key": "check the bucket and path"}[case] in err, err
    if case != "missing key":  # writing needs only the bucket: a missing key is a new prefix
        _timed_exit_2(["data-prep", "json", "--path", src, "--out_root", base, "--split", "train"], capsys, base)
        _timed_exit_2(["convert", "--composer_path", checkpoints["full"], "--hf_output_path", base], capsys, base)
