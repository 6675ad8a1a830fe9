"""Commands replace or remove only what they wrote themselves (issue 24): `convert --hf_output_path`,
`data-prep train-tokenizer --out`, `data-prep text --output_folder` and `quickstart --out_dir` refuse a
folder holding anything they did not write (a user's model, notes, data, another command's output) with
exit 2, a message naming the folder and `--overwrite`, no traceback and every file around unchanged byte
for byte; they rebuild their own output (the folder's `.llmfoundry_lite.json` lists it); `--overwrite`
replaces what they write and keeps every other file. An unwritable output folder is a clear error too."""
import json
import os
import pathlib
import shlex

import pytest
import torch

from llmfoundry_lite import quickstart
from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.files import MANIFEST, claim_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

from tree import snapshot

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EOS = "<|endoftext|>"


# ---- helpers -----------------------------------------------------------------------------------

def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_refused(code, output, folder):
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    assert str(folder) in output and "--overwrite" in output, output[-3000:]


def write(path, content) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def user_model_folder(folder, tokenizer_dir):
    """Somebody's own model: weights, a config of another architecture, another model's tokenizer, notes."""
    write(folder / "model.safetensors", os.urandom(2048))
    write(folder / "config.json", json.dumps({"model_type": "llama", "vocab_size": 32000}))
    write(folder / "tokenizer.json", pathlib.Path(tokenizer_dir, "tokenizer.json").read_bytes())
    write(folder / "notes.txt", "my experiment notes\n")
    write(folder / "README.md", "# my model card\n")
    return folder


def manifest(folder) -> dict:
    return json.loads((folder / MANIFEST).read_text())


# ---- convert -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """A full Composer checkpoint of a tiny MPT with its tokenizer (the layout ComposerMPTCausalLM saves)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=len(tok)))
    files = {}
    for name in os.listdir(tiny_tokenizer_dir):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext not in (".json", ".jinja"):
            continue
        text = open(os.path.join(tiny_tokenizer_dir, name), encoding="utf-8").read()
        files[stem] = {"file_extension": ext, "content": json.loads(text) if ext == ".json" else text}
    hf = {"model": {"config": {"content": model.config.to_dict()}}, "tokenizer": files}
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}, "integrations": {"huggingface": hf}}
    path = tmp_path_factory.mktemp("ckpt") / "latest-rank0.pt"
    torch.save({"state": state}, path)
    return str(path)


def convert(checkpoint, out, *extra):
    return ["convert", "--composer_path", checkpoint, "--hf_output_path", str(out), *extra]


def test_convert_refuses_a_users_model_folder(checkpoint, tiny_tokenizer_dir, tmp_path, capsys):
    target = user_model_folder(tmp_path / "their_model", tiny_tokenizer_dir)
    write(tmp_path / "beside.txt", "a file next to the folder")
    before = snapshot(tmp_path)
    code, output = run(convert(checkpoint, target), capsys)
    assert_refused(code, output, target)
    assert "model.safetensors" in output and "did not write" in output
    assert snapshot(tmp_path) == before  # not a byte changed, no manifest, no staging folder


def test_convert_rebuilds_its_own_export_and_keeps_other_files(checkpoint, tmp_path, capsys):
    from llmfoundry_lite.export import load_hf_model
    out = tmp_path / "deep" / "missing" / "hf"  # missing parents are created
    assert run(convert(checkpoint, out), capsys)[0] == 0
    written = set(manifest(out)["files"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= written
    assert set(os.listdir(out)) == written | {MANIFEST}
    write(out / "notes.txt", "added by the user\n")
    # again, sharded: the earlier model.safetensors (ours) goes, the user's notes stay
    assert run(convert(checkpoint, out, "--max_shard_size", "20KB"), capsys)[0] == 0
    assert not (out / "model.safetensors").exists() and (out / "model.safetensors.index.json").exists()
    assert (out / "notes.txt").read_text() == "added by the user\n"
    # and back to one file: the shards and their index (ours) go
    assert run(convert(checkpoint, out), capsys)[0] == 0
    assert not list(out.glob("model-*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    assert sorted(os.listdir(out)) == sorted(set(manifest(out)["files"]) | {MANIFEST, "notes.txt"})
    load_hf_model(str(out))
    # a weights file the user dropped into our export would mix with ours: refused after the work, nothing moved
    write(out / "model-00001-of-00002.safetensors", os.urandom(512))
    before = snapshot(tmp_path)
    code, output = run(convert(checkpoint, out), capsys)
    assert_refused(code, output, out)
    assert "model-00001-of-00002.safetensors" in output
    assert snapshot(tmp_path) == before


def test_convert_overwrite_replaces_the_model_and_keeps_unrelated_files(checkpoint, tiny_tokenizer_dir, tmp_path,
                                                                        capsys):
    from llmfoundry_lite.export import load_hf_model
    target = user_model_folder(tmp_path / "their_model", tiny_tokenizer_dir)
    write(target / "pytorch_model.bin", os.urandom(256))  # weights transformers could load instead: replaced
    kept = {name: (target / name).read_bytes() for name in ("notes.txt", "README.md")}
    assert run(convert(checkpoint, target, "--overwrite"), capsys)[0] == 0
    assert {name: (target / name).read_bytes() for name in kept} == kept
    assert not (target / "pytorch_model.bin").exists()
    assert json.loads((target / "config.json").read_text())["model_type"] == "mpt"
    assert "notes.txt" not in manifest(target)["files"]
    load_hf_model(str(target))
    # now it is our export: a plain re-run works and still keeps the user's files
    assert run(convert(checkpoint, target), capsys)[0] == 0
    assert {name: (target / name).read_bytes() for name in kept} == kept


def test_hf_checkpointer_style_repeated_writes(tmp_path):
    """The hf_checkpointer callback writes through write_hf_folder into its own folders, again after a resume."""
    from llmfoundry_lite.export import write_hf_folder
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64))
    for _ in range(2):
        write_hf_folder(model.config, model.state_dict(), tmp_path / "ba3", log=lambda m: None)
    write(tmp_path / "ba6" / "notes.txt", "theirs")
    with pytest.raises(UserError, match="overwrite=True"):
        write_hf_folder(model.config, model.state_dict(), tmp_path / "ba6", log=lambda m: None)
    assert os.listdir(tmp_path / "ba6") == ["notes.txt"]


# ---- data-prep train-tokenizer -----------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path_factory):
    from conftest import stdlib_docstrings
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(stdlib_docstrings(30_000))
    return str(path)


def train_tokenizer(corpus, out, *extra):
    return ["data-prep", "train-tokenizer", corpus, "--out", str(out), "--vocab_size", "300", *extra]


def test_train_tokenizer_refuses_a_model_folder(corpus, tiny_tokenizer_dir, tmp_path, capsys):
    from llmfoundry_lite.export import write_hf_folder
    theirs = user_model_folder(tmp_path / "their_model", tiny_tokenizer_dir)
    ours = tmp_path / "our_export"  # an HF export of ours: its manifest is the export's, not the tokenizer's
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=len(tok)))
    write_hf_folder(model.config, model.state_dict(), ours, tok, log=lambda m: None)
    before = snapshot(tmp_path)
    for target in (theirs, ours):
        code, output = run(train_tokenizer(corpus, target), capsys)
        assert_refused(code, output, target)
    assert "HF export wrote it" in output and "another vocabulary" in output
    assert snapshot(tmp_path) == before


def test_train_tokenizer_reruns_on_its_own_folder_and_overwrite_keeps_the_model(corpus, tiny_tokenizer_dir,
                                                                                tmp_path, capsys):
    from transformers import AutoTokenizer
    out = tmp_path / "tok"
    assert run(train_tokenizer(corpus, out), capsys)[0] == 0
    write(out / "notes.txt", "mine")
    assert run(train_tokenizer(corpus, out, "--vocab_size", "320"), capsys)[0] == 0
    assert len(AutoTokenizer.from_pretrained(str(out))) == 320 and (out / "notes.txt").read_text() == "mine"
    theirs = user_model_folder(tmp_path / "their_model", tiny_tokenizer_dir)
    kept = {n: (theirs / n).read_bytes() for n in ("model.safetensors", "config.json", "notes.txt", "README.md")}
    assert run(train_tokenizer(corpus, theirs, "--overwrite"), capsys)[0] == 0
    assert {n: (theirs / n).read_bytes() for n in kept} == kept
    assert len(AutoTokenizer.from_pretrained(str(theirs))) == 300  # the tokenizer was replaced, as asked


# ---- data-prep text ----------------------------------------------------------------------------

@pytest.fixture
def txt_folder(tmp_path):
    for i in range(6):
        write(tmp_path / "txt" / f"{i}.txt", f"document {i}: return the items of the list in order.\n" * 3)
    return str(tmp_path / "txt")


def text(src, out, *extra):
    return ["data-prep", "text", "--input_folder", src, "--output_folder", str(out), *extra]


def _samples(folder):
    return sum(s["samples"] for s in json.loads((folder / "index.json").read_text())["shards"])


def their_data(folder):
    write(folder / "notes.txt", "my data notes")
    write(folder / "index.json", json.dumps({"version": 2, "shards": []}))
    write(folder / "shard.00000.mds", os.urandom(300))
    write(folder / "raw" / "part-0.txt", "their raw text")
    return folder


@pytest.mark.parametrize("extra", [[], ["--reprocess"]], ids=["plain", "reprocess"])
def test_text_refuses_a_data_folder_it_did_not_write(txt_folder, tmp_path, capsys, extra):
    target = their_data(tmp_path / "mydata")
    before = snapshot(tmp_path)
    code, output = run(text(txt_folder, target, *extra), capsys)
    assert_refused(code, output, target)
    assert snapshot(tmp_path) == before


def test_text_reprocess_removes_only_what_it_wrote(txt_folder, tmp_path, capsys):
    out = tmp_path / "tx"
    assert run(text(txt_folder, out), capsys)[0] == 0 and _samples(out) == 6
    write(out / "notes.txt", "mine")
    write(out / "extra" / "keep.txt", "mine too")
    code, output = run(text(txt_folder, out), capsys)
    assert code == 0 and "already converted" in output
    assert run(text(txt_folder, out, "--reprocess", "--files_per_group", "1"), capsys)[0] == 0
    assert _samples(out) == 6 and sorted(p.name for p in out.glob("group_*")) == [f"group_{i:05d}" for i in range(6)]
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra" / "keep.txt").read_text() == "mine too"
    # fewer groups again: the earlier run's extra groups (ours) are removed too
    assert run(text(txt_folder, out, "--reprocess", "--files_per_group", "3"), capsys)[0] == 0
    assert sorted(p.name for p in out.glob("group_*")) == ["group_00000", "group_00001"] and _samples(out) == 6


def test_text_overwrite_keeps_unrelated_files(txt_folder, tmp_path, capsys):
    target = their_data(tmp_path / "mydata")
    kept = {n: (target / n).read_bytes() for n in ("notes.txt", "shard.00000.mds", "raw/part-0.txt")}
    assert run(text(txt_folder, target, "--overwrite"), capsys)[0] == 0
    assert {n: (target / n).read_bytes() for n in kept} == kept
    assert _samples(target) == 6  # its index.json was replaced by the conversion's
    assert run(text(txt_folder, target, "--reprocess"), capsys)[0] == 0  # now ours: no --overwrite needed
    assert {n: (target / n).read_bytes() for n in kept} == kept


# ---- quickstart --------------------------------------------------------------------------------

def qs(out, *extra):
    return ["quickstart", "--tiny", "--out_dir", str(out), *extra]


@pytest.mark.parametrize("case", ["users-folder", "older-quickstart-output"])
def test_quickstart_refuses_before_any_work(tmp_path, capsys, monkeypatch, case):
    def no_step(*_):
        raise AssertionError("a step ran")
    monkeypatch.setattr(quickstart, "_run_logged", no_step)
    out = tmp_path / "qs"
    if case == "users-folder":
        write(out / "notes.txt", "mine")
        write(out / "data" / "mine.jsonl", '{"text": "mine"}\n')
        write(out / "hf" / "model.safetensors", os.urandom(128))
    else:  # written before the manifest existed: refused too (pass --overwrite once)
        write(out / ".steps" / "corpus.json", json.dumps({"argv": ["python"], "done": True}))
        write(out / "corpus" / "train.jsonl", '{"text": "x"}\n')
    before = snapshot(tmp_path)
    code, output = run(qs(out), capsys)
    assert_refused(code, output, out)
    assert snapshot(tmp_path) == before


def fake_steps(calls):
    """Stands in for the quickstart's commands: records the step and writes its outputs."""
    def run_logged(step, log_path):
        calls.append(step.name)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        for path in step.outputs:
            if path.endswith(".jsonl"):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "a") as f:
                    f.write("{}\n")
            else:
                os.makedirs(path, exist_ok=True)
                write(pathlib.Path(path) / "out.txt", step.name)
        return 0
    return run_logged


def test_quickstart_reruns_resumes_and_overwrites_only_its_own_entries(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(quickstart, "_run_logged", fake_steps(calls))
    monkeypatch.setattr(quickstart, "_finish", lambda *a: "summary")
    out = tmp_path / "qs"
    steps = quickstart.plan(quickstart.layout(str(out)), quickstart.SIZES["tiny"], "6ba", 2)
    assert run(qs(out), capsys)[0] == 0 and len(calls) == len(steps)
    assert set(quickstart.outputs(quickstart.layout(str(out)), steps)) == set(manifest(out)["files"])
    write(out / "notes.txt", "mine")
    write(out / "data" / "mine.jsonl", "mine")
    calls.clear()
    assert run(qs(out), capsys)[0] == 0 and calls == []  # a second run reuses every step
    # an interrupted training run: its checkpoints stay for autoresume, the later steps run again
    record = out / ".steps" / "pretrain.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "done": False}))
    write(out / "checkpoints" / "mpt-tiny-cpu" / "ep0-ba3-rank0.pt", "checkpoint")
    assert run(qs(out), capsys)[0] == 0
    assert calls == ["pretrain", "eval", "export", "generate"]
    assert (out / "checkpoints" / "mpt-tiny-cpu" / "ep0-ba3-rank0.pt").read_text() == "checkpoint"
    calls.clear()
    assert run(qs(out, "--fresh"), capsys)[0] == 0 and len(calls) == len(steps)
    assert not (out / "checkpoints" / "mpt-tiny-cpu" / "ep0-ba3-rank0.pt").exists()  # ours: a fresh run removes it
    assert (out / "notes.txt").read_text() == "mine" and (out / "data" / "mine.jsonl").read_text() == "mine"

    theirs = tmp_path / "theirs"
    write(theirs / "notes.txt", "mine")
    write(theirs / "data" / "mine.jsonl", "mine")
    write(theirs / "corpus" / "train.jsonl", "their corpus")
    calls.clear()
    assert run(qs(theirs, "--overwrite"), capsys)[0] == 0 and len(calls) == len(steps)
    assert (theirs / "notes.txt").read_text() == "mine" and (theirs / "data" / "mine.jsonl").read_text() == "mine"
    assert (theirs / "corpus" / "out.txt").read_text() == "corpus"  # its own entry was replaced, as --overwrite says
    assert not (theirs / "corpus" / "train.jsonl").exists()


# ---- the mechanism, and unwritable places ------------------------------------------------------

def test_a_manifest_never_reaches_outside_its_folder(tmp_path):
    victim = write(tmp_path / "victim.txt", "keep")
    folder = tmp_path / "out"
    write(folder / MANIFEST, json.dumps({"writer": "data-prep text", "files": ["../victim.txt"]}))
    write(folder / "x", "theirs")
    with pytest.raises(UserError, match="--overwrite"):  # not a manifest of ours: the folder is someone else's
        claim_folder(str(folder), "data-prep text", "--output_folder")
    assert open(victim).read() == "keep"


UNWRITABLE = "/proc/sys/llmfoundry_lite_test_out"  # a location nobody can create files in, root neither


def _argv(command, out, checkpoint, corpus, txt_folder):
    return {"convert": lambda: convert(checkpoint, out), "train-tokenizer": lambda: train_tokenizer(corpus, out),
            "text": lambda: text(txt_folder, out), "quickstart": lambda: qs(out)}[command]()


@pytest.mark.parametrize("command", ["convert", "train-tokenizer", "text", "quickstart"])
def test_unwritable_output_is_a_clear_error(command, checkpoint, corpus, txt_folder, capsys, monkeypatch):
    monkeypatch.setattr(quickstart, "_run_logged", lambda *a: pytest.fail("a step ran"))
    code, output = run(_argv(command, UNWRITABLE, checkpoint, corpus, txt_folder), capsys)
    assert code == 2 and "Traceback" not in output, output[-3000:]
    assert UNWRITABLE in output and "cannot write" in output


def test_read_only_output_folder_is_a_clear_error(checkpoint, corpus, txt_folder, tmp_path):
    """A really read-only folder (a read-only mount: root cannot write there either), each command in turn."""
    import sys

    from mounts import in_private_mounts, read_only
    ro, logs = tmp_path / "ro", tmp_path / "logs"
    logs.mkdir()
    commands = ["convert", "train-tokenizer", "text", "quickstart"]
    script = "; ".join(f'"$@" {shlex.join(_argv(c, ro / c, checkpoint, corpus, txt_folder))} > {logs / c} 2>&1; '
                       f'echo $? > {logs / c}.rc' for c in commands)
    proc = in_private_mounts(read_only(ro), ["sh", "-c", script, "sh", sys.executable, "-m", "llmfoundry_lite.cli"])
    assert proc.returncode == 0, proc.stderr
    for c in commands:
        output = (logs / c).read_text()
        assert (logs / f"{c}.rc").read_text().strip() == "2" and "Traceback" not in output, (c, output[-3000:])
        assert str(ro / c) in output and "cannot write" in output, (c, output)
    assert os.listdir(ro) == []

