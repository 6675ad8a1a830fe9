"""`llmfoundry-lite quickstart --tiny` end to end: every artifact is there, and a re-run reuses the steps."""
import json
import os
import subprocess
import sys

import pytest

from llmfoundry_lite import quickstart
from llmfoundry_lite.quickstart_corpus import documents, is_val, write_corpus

BIN = os.path.dirname(sys.executable)


def test_corpus_is_deterministic_and_split_stably(tmp_path):
    a, b = write_corpus(str(tmp_path / "a"), max_docs=200), write_corpus(str(tmp_path / "b"), max_docs=200)
    assert a == b and a["train_docs"] + a["val_docs"] == 200 and a["val_docs"] > 0
    for name in ("train.jsonl", "val.jsonl", "train.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    docs = documents()
    assert len(docs) == len(set(docs)) > 1000  # deduplicated, and a real corpus
    val = [json.loads(line)["text"] for line in (tmp_path / "a" / "val.jsonl").open()]
    assert all(is_val(t, 0.05) for t in val)
    # the split of a document depends on its text only, not on which other documents are present
    assert sorted(val) == sorted(d for d in docs[:200] if is_val(d, 0.05))


def test_plan_prints_ordinary_commands(tmp_path):
    steps = quickstart.plan(quickstart.layout("qs"), quickstart.SIZES["full"], "300ba", 2)
    assert [s.name for s in steps] == ["corpus", "tokenizer", "data_train", "data_val", "pretrain", "eval",
                                      "export", "generate"]
    train = steps[4]
    assert train.argv[:5] == ["composer", "-n", "2", "scripts/train.py", "yamls/pretrain/mpt-tiny-cpu.yaml"]
    assert train.env == {"OMP_NUM_THREADS": "1"} and train.resumable
    assert all(s.argv[0] in ("python", "llmfoundry-lite", "composer") for s in steps)


def _quickstart(out, *extra):
    env = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run([os.path.join(BIN, "llmfoundry-lite"), "quickstart", "--tiny", "--out_dir", str(out), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.multiprocess
def test_quickstart_tiny_end_to_end_and_rerun_reuses(tmp_path):
    out = tmp_path / "qs"
    first = _quickstart(out)
    paths = quickstart.layout(str(out))
    for path in (paths.tokenizer + "/tokenizer.json", paths.data + "/train/index.json", paths.data + "/val/index.json",
                 paths.hf + "/config.json", paths.eval + "/results.json", paths.plot, paths.summary):
        assert os.path.exists(path), path
    with open(paths.plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(paths.hf + "/config.json"))["model_type"] == "mpt"
    metrics = quickstart.read_metrics(paths.metrics)
    evals = metrics[quickstart.EVAL_LOSS]
    assert evals[0][0] == 0 and evals[-1][0] == 6  # eval_first, then the final model
    assert evals[-1][1] < evals[0][1]              # even 6 batches lower the validation loss
    summary = open(paths.summary).read()
    assert "HF export loads with stock transformers as MptForCausalLM" in summary
    assert "composer -n 2 scripts/train.py yamls/pretrain/mpt-tiny-cpu.yaml" in summary
    assert "generated: " in summary and first.count("(done before: reused") == 0

    second = _quickstart(out)
    assert second.count("(done before: reused") == 8  # every step, none redone
    assert os.path.exists(paths.plot)
