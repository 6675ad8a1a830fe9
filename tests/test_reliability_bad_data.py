"""The bad-data corpus: every bad input a user can hand to data prep, training, conversion or
generation (malformed lines, invalid chats, wrongly typed fields, output paths that are files, data
folders streaming cannot use, broken JSON files, foreign checkpoints, chat templates that Jinja or its
sandbox refuses) ends in exit 2 with a message naming the problem, no traceback, and nothing
half-written that looks finished. Each case runs the `llmfoundry-lite` command in-process. Output paths
that are symbolic links (to someone's folder, to a file, to nothing) are refused before any work with
every file left as it was, byte for byte. The last tests interrupt conversions (an error, a SIGKILL) and
then train on what they left. docs/RELIABILITY.md lists the classes of bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from llmfoundry_lite.cli import main

from train_utils import TINY_YAML, tiny_overrides, write_copy_task
from tree import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Workspace:
    """A scratch folder with helpers to write the bad inputs of one case."""

    def __init__(self, path, tokenizer):
        self.path, self.tokenizer = path, tokenizer

    def __call__(self, name: str) -> str:
        return str(self.path / name)

    def write(self, name: str, text, binary: bool = False) -> str:
        target = self.path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(text) if binary else target.write_text(text)
        return str(target)

    def jsonl(self, name: str, *rows) -> str:
        return self.write(name, "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))

    def json_prep(self, src: str, *extra, out=None, tokenizer=None) -> list:
        return ["data-prep", "json", "--path", src, "--out_root", out or self("out"), "--concat_tokens", "16",
                "--tokenizer", tokenizer or self.tokenizer, *extra]

    def chat_prep(self, *rows, out=None) -> list:
        return ["data-prep", "finetuning", "--dataset", self.jsonl("chat.jsonl", *rows), "--splits", "train",
                "--out_root", out or self("out")]

    def train(self, data: str) -> list:
        return ["train", TINY_YAML, *tiny_overrides(data, self.tokenizer)]

    def broken_tokenizer(self) -> str:
        import shutil
        shutil.copytree(self.tokenizer, self("tok"))
        self.write("tok/tokenizer.json", '{"version": "1.0", "truncation": null, "model": {')
        return self("tok")

    def tokenizer_with_template(self, template: str) -> str:
        """A copy of the tokenizer whose folder's own chat template (chat_template.jinja) is `template`."""
        import shutil
        shutil.copytree(self.tokenizer, self("tok"))
        assert os.path.isfile(self("tok/chat_template.jinja"))  # where transformers reads it from
        self.write("tok/chat_template.jinja", template)
        return self("tok")

    def pref_prep(self, *extra, tokenizer=None) -> list:
        pair = {"prompt": "What does len return?", "chosen": "The number of items.", "rejected": "A list."}
        return ["data-prep", "preference", "--dataset", self.jsonl("pairs.jsonl", pair), "--splits", "train",
                "--out_root", self("out"), "--tokenizer", tokenizer or self.tokenizer, "--max_seq_len", "32", *extra]


def chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


GOOD = {"text": "Return the sum of the items in the list."}
U, A = ("user", "What does len return?"), ("assistant", "The number of items.")
# chat templates that try to leave jinja2's sandbox (transformers renders templates in it)
ESCAPE_STR, ESCAPE_CYCLER = "{{ ''.__class__.__mro__ }}", "{{ cycler.__init__.__globals__ }}"
ESCAPE_STR_REFUSED = "is refused by the sandbox (access to attribute '__class__' of 'str' object is unsafe)"

# id -> (build the case in a Workspace and return the argv, a fragment the error must contain)
CASES = {
    # ---- pretraining data prep (json) ----
    "json-malformed-line": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD, '{"text": oops\n')), "d.jsonl:2: malformed JSON"),
    "json-not-utf8": (lambda w: w.json_prep(w.write("d.jsonl", b'{"text": "\xff\xfe"}\n', binary=True)), "not UTF-8"),
    "json-missing-field": (lambda w: w.json_prep(w.jsonl("d.jsonl", {"body": "x"})), "no 'text' field"),
    "json-text-is-a-number": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD, {"text": 7})), "d.jsonl:2: 'text' is a int"),
    "json-line-is-an-array": (lambda w: w.json_prep(w.jsonl("d.jsonl", [1, 2])), "has list"),
    "json-array-file-invalid": (lambda w: w.json_prep(w.write("d.json", '[{"text": "a"},\n {"text": }]')), "invalid JSON at line 2"),
    "json-empty-input": (lambda w: w.json_prep(w.write("d.jsonl", "\n\n")), "no documents"),
    "json-input-missing": (lambda w: w.json_prep(w("nope.jsonl")), "input not found"),
    "json-out-root-is-a-file": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD), out=w.write("f", "x")),
                                "is a file, not a folder"),
    "json-out-root-parent-is-a-file": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD), out=w.write("f", "x") + "/sub"),
                                       "is a file, not a folder"),
    "json-out-root-not-empty": (lambda w: [w.write("out/old.txt", "x"), w.json_prep(w.jsonl("d.jsonl", GOOD))][1], "is not empty"),
    "json-concat-without-tokenizer": (lambda w: ["data-prep", "json", "--path", w.jsonl("d.jsonl", GOOD),
                                                 "--out_root", w("out"), "--concat_tokens", "16"], "go together"),
    "json-tokenizer-json-broken": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD), tokenizer=w.broken_tokenizer()),
                                   "tokenizer.json is not valid JSON"),
    "json-tokenizer-missing": (lambda w: w.json_prep(w.jsonl("d.jsonl", GOOD), tokenizer=w("no_tokenizer")), "cannot load"),
    # ---- finetuning data prep: chats and examples ----
    "chat-unknown-role": (lambda w: w.chat_prep(chat(("wizard", "hi"), A)), "role 'wizard'"),
    "chat-two-user-messages": (lambda w: w.chat_prep(chat(U, U, A)), "message 1 (user) is out of order"),
    "chat-starts-with-assistant": (lambda w: w.chat_prep(chat(A, U, A)), "message 0 (assistant) is out of order"),
    "chat-ends-with-user": (lambda w: w.chat_prep(chat(U, A, U)), "must end with an assistant message"),
    "chat-system-not-first": (lambda w: w.chat_prep(chat(U, ("system", "be terse"), A)), "only the first message"),
    "chat-messages-is-a-string": (lambda w: w.chat_prep({"messages": "hello"}), "messages must be a list"),
    "chat-messages-empty": (lambda w: w.chat_prep({"messages": []}), "messages is empty"),
    "chat-content-is-a-number": (lambda w: w.chat_prep({"messages": [{"role": "user", "content": 3}, dict(zip(("role", "content"), A, strict=True))]}),
                                 "has a int content"),
    "chat-message-without-content": (lambda w: w.chat_prep({"messages": [{"role": "user"}]}), "role and content"),
    "chat-message-is-a-string": (lambda w: w.chat_prep({"messages": ["hi"]}), "role and content"),
    "example-line-is-an-array": (lambda w: w.chat_prep([U]), "an example is a JSON object"),
    "example-prompt-not-a-string": (lambda w: w.chat_prep({"prompt": 1, "response": "x"}), "must be strings"),
    "example-unknown-layout": (lambda w: w.chat_prep({"question": "a"}), "expected prompt/response or messages"),
    "example-malformed-line": (lambda w: w.chat_prep(chat(U, A), '{"messages": [\n'), "chat.jsonl:2: malformed JSON"),
    "finetuning-out-root-is-a-file": (lambda w: w.chat_prep(chat(U, A), out=w.write("f", "x")), "is a file, not a folder"),
    "finetuning-max-seq-len-needs-tokenizer": (lambda w: w.chat_prep(chat(U, A)) + ["--max_seq_len", "8"], "needs --tokenizer"),
    # ---- text folders and tokenizer training ----
    "text-output-is-a-file": (lambda w: ["data-prep", "text", "--input_folder", os.path.dirname(w.write("in/a.txt", "hi")),
                                         "--output_folder", w.write("f", "x")], "is a file, not a folder"),
    "text-not-utf8": (lambda w: ["data-prep", "text", "--input_folder", os.path.dirname(w.write("in/a.txt", b"\xff\xfe", True)),
                                 "--output_folder", w("out")], "not UTF-8"),
    "text-input-missing": (lambda w: ["data-prep", "text", "--input_folder", w("nope"), "--output_folder", w("out")],
                           "input not found"),
    "text-input-has-no-txt": (lambda w: ["data-prep", "text", "--input_folder", os.path.dirname(w.write("in/a.md", "x")),
                                         "--output_folder", w("out")], "no .txt files"),
    "tokenizer-out-is-a-file": (lambda w: ["data-prep", "train-tokenizer", w.write("t.txt", "some text " * 50),
                                           "--out", w.write("f", "x"), "--vocab_size", "300"], "is a file, not a folder"),
    "tokenizer-input-not-utf8": (lambda w: ["data-prep", "train-tokenizer", w.write("t.txt", b"\xff\xfe\xfd", True),
                                            "--out", w("tok_out"), "--vocab_size", "300"], "not UTF-8"),
    # ---- training on data folders streaming cannot use ----
    "train-data-folder-missing": (lambda w: w.train(w("nope")), "does not exist"),
    "train-split-folder-missing": (lambda w: [os.makedirs(w("data/val")), w.train(w("data"))][1], "data/train does not exist"),
    "train-shards-without-index": (lambda w: w.train(os.path.dirname(os.path.dirname(w.write("data/train/shard.00000.mds", "x")))),
                                   "MDS shards but no index.json"),
    "train-folder-without-index": (lambda w: w.train(os.path.dirname(os.path.dirname(w.write("data/train/notes.txt", "x")))),
                                   "has no index.json"),
    "train-unfinished-text-conversion": (lambda w: w.train(os.path.dirname(os.path.dirname(w.write("data/train/plan.json", "{}")))),
                                         "unfinished `data-prep text` conversion"),
    "train-index-lists-a-missing-shard": (lambda w: w.train(_drop_a_shard(w)), "listed in its index.json but missing"),
    "train-finetuning-file-with-a-bad-chat": (lambda w: ["train", _finetuning_yaml(w, w.jsonl(
        "sft.jsonl", chat(U, A), chat(("wizard", "hi"), A)))], "role 'wizard'"),
    # ---- conversion and model folders ----
    "convert-output-is-a-file": (lambda w: ["convert", "--composer_path", w.write("c.pt", "x"), "--hf_output_path",
                                            w.write("f", "x")], "is a file, not a folder"),
    "convert-random-pt": (lambda w: ["convert", "--composer_path", w.write("c.pt", os.urandom(256), True),
                                     "--hf_output_path", w("hf")], "is not a Composer checkpoint"),
    "convert-checkpoint-missing": (lambda w: ["convert", "--composer_path", w("c.pt"), "--hf_output_path", w("hf")],
                                   "checkpoint not found"),
    "generate-config-json-broken": (lambda w: ["generate", os.path.dirname(w.write("hf/config.json", '{"model_type": "mpt",')),
                                               "--prompts", "hi"], "config.json is not valid JSON"),
    "generate-config-json-a-list": (lambda w: ["generate", os.path.dirname(w.write("hf/config.json", "[]")),
                                               "--prompts", "hi"], "not a model config object"),
    # ---- a chat template that refuses a chat: the example is named ----
    "finetuning-chat-template-raises": (lambda w: w.chat_prep(chat(U, A)) + ["--chat_template",
                                        "{{ raise_exception('only chats with a system message') }}"],
                                        "chat.jsonl:1: --chat_template cannot render this chat (only chats with a "
                                        "system message)"),
}

# Chat templates Jinja cannot parse or its sandbox refuses, from every place a template comes from (a flag, a
# dataset key, the tokenizer folder's own): refused before anything is written, so not even out/ appears.
TEMPLATE_CASES = {
    "finetuning-chat-template-escapes-the-sandbox": (lambda w: w.chat_prep(chat(U, A)) + ["--chat_template", ESCAPE_STR],
                                                     "--chat_template " + ESCAPE_STR_REFUSED),
    "finetuning-chat-template-escapes-with-tokenizer": (
        lambda w: w.chat_prep(chat(U, A)) + ["--chat_template", ESCAPE_CYCLER, "--tokenizer", w.tokenizer],
        "--chat_template is refused by the sandbox (access to attribute '__init__' of 'type' object is unsafe)"),
    "finetuning-chat-template-syntax-error": (lambda w: w.chat_prep(chat(U, A)) + ["--chat_template",
                                                                                   "{% for m in messages %}{{ m }}"],
                                              "--chat_template is not a valid Jinja template (line 1: Unexpected end of template"),
    "finetuning-prompt-response-still-checks-the-template": (
        lambda w: w.chat_prep({"prompt": "a", "response": "b"}) + ["--chat_template", ESCAPE_STR],
        "--chat_template " + ESCAPE_STR_REFUSED),
    "finetuning-tokenizer-folder-template-escapes": (
        lambda w: w.chat_prep(chat(U, A)) + ["--tokenizer", w.tokenizer_with_template(ESCAPE_STR)],
        "tok (chat_template.jinja) " + ESCAPE_STR_REFUSED),
    "preference-chat-template-escapes-the-sandbox": (lambda w: w.pref_prep("--chat_template", ESCAPE_CYCLER),
                                                     "--chat_template is refused by the sandbox"),
    "preference-tokenizer-folder-template-escapes": (
        lambda w: w.pref_prep(tokenizer=w.tokenizer_with_template(ESCAPE_STR)),
        "tok (chat_template.jinja) " + ESCAPE_STR_REFUSED),
    "train-finetuning-chat-template-key-escapes": (
        lambda w: ["train", _finetuning_yaml(w, w.jsonl("sft.jsonl", chat(U, A)), chat_template=ESCAPE_STR)],
        "dataset.chat_template " + ESCAPE_STR_REFUSED),
    "train-finetuning-tokenizer-folder-template-escapes": (
        lambda w: ["train", _finetuning_yaml(w, w.jsonl("sft.jsonl", chat(U, A)),
                                             tokenizer=w.tokenizer_with_template(ESCAPE_CYCLER))],
        "tok (chat_template.jinja) is refused by the sandbox"),
}
CASES.update(TEMPLATE_CASES)


def _drop_a_shard(w: Workspace) -> str:
    data = write_copy_task(w("data"), n_train=4000, n_val=16)
    shards = sorted(n for n in os.listdir(os.path.join(data, "train")) if n.endswith(".mds"))
    os.remove(os.path.join(data, "train", shards[-1]))
    return data


def _finetuning_yaml(w: Workspace, data_file: str, tokenizer=None, **dataset) -> str:
    cfg = yaml.safe_load(open(TINY_YAML))
    cfg["variables"].update(tokenizer_name=tokenizer or w.tokenizer, data_local=w("unused"))
    cfg["train_loader"] = {"name": "finetuning", "drop_last": False, "num_workers": 0,
                           "dataset": {"hf_name": data_file, "split": "train", "max_seq_len": 64, **dataset}}
    cfg.pop("eval_loader", None)
    return w.write("sft.yaml", yaml.safe_dump(cfg))


def _run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_a_clear_error(case, tmp_path, tiny_tokenizer_dir, capsys):
    build, fragment = CASES[case]
    argv = build(Workspace(tmp_path, tiny_tokenizer_dir))
    code, output = _run(argv, capsys)
    assert code == 2, output[-2000:]
    assert fragment in output, output[-2000:]
    assert "Traceback" not in output
    # nothing half-written that a loader would take for finished data
    out = tmp_path / "out"
    assert not (out / "index.json").exists() and not (out / "train" / "index.json").exists()
    if case in TEMPLATE_CASES:  # the template is checked before any output is written
        assert not out.exists(), sorted(os.listdir(out))


# ---- output paths that are symbolic links ----
# Each case plants a link in a Workspace that also holds someone's folder and file (`_someones_data`) and
# returns (argv, a fragment the error must contain). The split a command publishes (out/train, or out
# itself for `data-prep json` without --split) is renamed onto its path, so a link there is refused,
# whatever it points to; a link further up, or `data-prep text`'s folder (written into, not renamed
# onto), may lead to a folder, never to a file or nothing.

def _link(w: Workspace, name: str, target: str) -> str:
    os.makedirs(os.path.dirname(w(name)), exist_ok=True)
    os.symlink(target, w(name))
    return w(name)


def _someones_data(w: Workspace) -> None:
    w.write("someone/notes.txt", "someone's notes\n")
    w.write("someone/sub/data.bin", bytes(range(256)) * 4, binary=True)
    w.write("someone.txt", "someone's file\n")
    os.makedirs(w("empty"))


def _text_prep(w: Workspace, out: str) -> list:
    return ["data-prep", "text", "--input_folder", os.path.dirname(w.write("in/a.txt", "some text")),
            "--output_folder", out]


def _jsonl_prep(w: Workspace, *extra, out=None) -> list:
    return w.json_prep(w.jsonl("d.jsonl", GOOD), *extra, out=out)


LINK_CASES = {
    "json-split-links-to-someones-folder": lambda w: (
        _jsonl_prep(w, "--split", "train"), f"{_link(w, 'out/train', w('someone'))} is a symbolic link to the folder "
        f"{w('someone')}"),
    "json-split-links-to-an-empty-folder": lambda w: (
        _jsonl_prep(w, "--split", "train"), f"{_link(w, 'out/train', w('empty'))} is a symbolic link to the folder"),
    "json-split-links-to-a-file": lambda w: (
        _jsonl_prep(w, "--split", "train"), f"{_link(w, 'out/train', w('someone.txt'))} is a symbolic link to the "
        f"file {w('someone.txt')}"),
    "json-split-link-dangles": lambda w: (
        _jsonl_prep(w, "--split", "train"), f"{_link(w, 'out/train', w('nowhere'))} is a symbolic link to "
        f"{w('nowhere')}, which does not exist"),
    "json-out-root-is-the-split-and-a-link": lambda w: (  # without --split the split is out_root itself
        _jsonl_prep(w, out=_link(w, "out", w("empty"))), f"{w('out')} is a symbolic link to the folder"),
    "json-out-root-link-dangles": lambda w: (
        _jsonl_prep(w, "--split", "train", out=_link(w, "out", w("nowhere"))),
        f"{w('out')} (in {w('out/train')}) is a symbolic link to {w('nowhere')}, which does not exist"),
    "json-out-root-links-to-a-file": lambda w: (
        _jsonl_prep(w, "--split", "train", out=_link(w, "out", w("someone.txt"))),
        f"{w('out')} (in {w('out/train')}) is a symbolic link to the file"),
    "hf-split-links-to-someones-folder": lambda w: (
        ["data-prep", "hf", "--dataset", "json", "--data_files", f"train={w.jsonl('d.jsonl', GOOD)}", "--splits",
         "train", "--out_root", w("out")], f"{_link(w, 'out/train', w('someone'))} is a symbolic link to the folder"),
    "finetuning-split-links-to-someones-folder": lambda w: (
        w.chat_prep(chat(U, A)), f"{_link(w, 'out/train', w('someone'))} is a symbolic link to the folder"),
    "finetuning-split-link-dangles": lambda w: (
        w.chat_prep(chat(U, A)), f"{_link(w, 'out/train', w('nowhere'))} is a symbolic link to {w('nowhere')}, "
        "which does not exist"),
    "preference-split-links-to-someones-folder": lambda w: (
        w.pref_prep(), f"{_link(w, 'out/train', w('someone'))} is a symbolic link to the folder"),
    "text-output-link-dangles": lambda w: (
        _text_prep(w, _link(w, "out", w("nowhere"))), f"--output_folder: {w('out')} is a symbolic link to "
        f"{w('nowhere')}, which does not exist"),
    "text-output-links-to-a-file": lambda w: (
        _text_prep(w, _link(w, "out", w("someone.txt"))), f"--output_folder: {w('out')} is a symbolic link to the "
        f"file {w('someone.txt')}"),
    "text-output-links-to-someones-folder": lambda w: (  # followed, and refused as any foreign folder is
        _text_prep(w, _link(w, "out", w("someone"))), "holds notes.txt, sub, which llmfoundry-lite's data-prep text "
        "did not write"),
}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_symlinked_output_is_refused_before_any_work(case, tmp_path, tiny_tokenizer_dir, capsys):
    w = Workspace(tmp_path, tiny_tokenizer_dir)
    _someones_data(w)
    argv, fragment = LINK_CASES[case](w)
    before = snapshot(tmp_path)
    code, output = _run(argv, capsys)
    assert code == 2, output[-2000:]
    assert fragment in output, output[-2000:]
    assert "Traceback" not in output
    assert snapshot(tmp_path) == before  # nothing written, no link replaced, every target byte for byte


def test_out_root_linking_to_a_folder_is_that_folder(tmp_path, tiny_tokenizer_dir, capsys):
    """A link above the split (out_root on another disk) and `data-prep text`'s folder may lead to a
    folder: the split is published inside it, and what it held is kept, byte for byte."""
    w = Workspace(tmp_path, tiny_tokenizer_dir)
    _someones_data(w)
    before = snapshot(w("someone"))
    code, output = _run(_jsonl_prep(w, "--split", "train", out=_link(w, "out", w("someone"))), capsys)
    assert code == 0, output[-2000:]
    assert os.path.isfile(w("someone/train/index.json")) and os.path.islink(w("out"))
    code, output = _run(_text_prep(w, _link(w, "text_out", w("empty"))), capsys)
    assert code == 0, output[-2000:]
    assert os.path.isfile(w("empty/index.json")) and os.path.islink(w("text_out"))
    after = snapshot(w("someone"))
    assert {k: v for k, v in after.items() if not k.startswith("train")} == before


def test_planted_partial_links_are_removed_not_written_through(tmp_path, tiny_tokenizer_dir, capsys):
    """`.train.partial` and its `.json` marker are ours: links in their place (planted, or a run's left-overs
    made into links) are removed, and what they point to is left alone."""
    w = Workspace(tmp_path, tiny_tokenizer_dir)
    _someones_data(w)
    _link(w, "out/.train.partial.json", w("someone.txt"))
    _link(w, "out/.val.partial", w("someone"))
    before = snapshot(w("someone")), open(w("someone.txt"), "rb").read()
    for split in ("train", "val"):
        code, output = _run(_jsonl_prep(w, "--split", split), capsys)
        assert code == 0 and "left by an interrupted run" in output, output[-2000:]
    assert (snapshot(w("someone")), open(w("someone.txt"), "rb").read()) == before
    assert sorted(os.listdir(w("out"))) == ["train", "val"]


def test_failed_conversion_leaves_nothing_and_training_says_so(tmp_path, tiny_tokenizer_dir, capsys):
    """The issue's case: a malformed line far into the file stops `data-prep json` (exit 2) after many
    samples were written; training on the folder it named must not use them."""
    w = Workspace(tmp_path, tiny_tokenizer_dir)
    src = w.jsonl("d.jsonl", *([GOOD] * 2000), '{"text": oops\n', GOOD)
    code, output = _run(w.json_prep(src, "--split", "train"), capsys)
    assert code == 2 and "d.jsonl:2001: malformed JSON" in output
    assert not os.path.exists(w("out")) or not os.listdir(w("out"))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # the partial folder is gone too
    code, output = _run(w.train(w("out")), capsys)
    assert code == 2 and "out/train does not exist" in output and "Traceback" not in output
    # fixed input: the same command publishes the split
    w.jsonl("d.jsonl", *([GOOD] * 2000))
    code, output = _run(w.json_prep(src, "--split", "train"), capsys)
    assert code == 0 and os.path.isfile(w("out/train/index.json"))


def test_killed_conversion_is_named_when_training_and_redone_by_the_same_command(tmp_path, tiny_tokenizer_dir, capsys):
    w = Workspace(tmp_path, tiny_tokenizer_dir)
    src = w.jsonl("d.jsonl", *([{"text": f"Document {i}: return the items in order."} for i in range(30000)]))
    argv = w.json_prep(src, "--split", "train")
    proc = subprocess.Popen([sys.executable, "-m", "llmfoundry_lite.cli", *argv], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "out" / ".train.partial"
    deadline = time.time() + 120
    while not partial.is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.5)  # the run has started: loading the tokenizer or writing shards
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.is_dir(), "the conversion finished before it could be killed; give it more input"
    code, output = _run(w.train(w("out")), capsys)
    assert code == 2 and "was never finished" in output and "data-prep json" in output and str(partial) in output
    assert "Traceback" not in output
    code, output = _run(argv, capsys)  # the same command again: starts over and publishes
    assert code == 0 and "left by an interrupted run" in output
    assert os.path.isfile(w("out/train/index.json")) and not partial.exists()
