"""Training end to end in one process: the loop learns a synthetic task, autoresume continues
bit-exactly, eval metrics, the HF checkpointer and the offline wandb logger write what they promise."""
import glob
import os

import pytest
import torch

from train_utils import HALF, ROW, fresh_copy, read_losses, run, tiny_overrides, write_copy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "yamls", "pretrain", "mpt-tiny-cpu.yaml")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return write_copy_task(str(tmp_path_factory.mktemp("copy_task")))


def copy_accuracy(model, rows) -> float:
    """Next-token accuracy on the copied half (positions after SEP), teacher-forced."""
    ids = torch.as_tensor(rows, dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    pred = logits[:, HALF:-1].argmax(-1)   # position t predicts token t+1: SEP predicts a_1, ...
    return (pred == ids[:, HALF + 1:]).float().mean().item()


def test_tiny_model_learns_copy_task(copy_data, tiny_tokenizer_dir, tmp_path):
    """Copying needs attention to the right earlier position: learned position embeddings make that
    a one-layer job (with ALiBi alone it needs induction heads, thousands of steps)."""
    from train_utils import BEST_LOSS, copy_rows
    data = fresh_copy(copy_data, tmp_path, "data")
    trainer = run(*tiny_overrides(data, tiny_tokenizer_dir, max_duration="150ba", **{
        "model.d_model": 64, "model.n_heads": 4, "model.attn_config.alibi": "false",
        "scheduler.t_max": "150ba", "optimizer.lr": "6e-3", "loggers.jsonl.path": str(tmp_path / "m.jsonl")}))
    model = trainer.state.model.model.eval()
    acc = copy_accuracy(model, copy_rows(128, seed=7))   # rows not in the training data
    losses = [loss for _, loss in read_losses(str(tmp_path / "m.jsonl"))]
    assert losses[0] > 5.0                               # ~ln(400) at the start
    assert sum(losses[-10:]) / 10 < BEST_LOSS + 0.3, (BEST_LOSS, losses[-10:])
    assert acc > 0.95, f"copy accuracy {acc:.2f}"


def test_autoresume_continues_bit_exactly(copy_data, tiny_tokenizer_dir, tmp_path):
    def overrides(name, duration):
        return tiny_overrides(fresh_copy(copy_data, tmp_path, f"{name}-{duration}"), tiny_tokenizer_dir, **{
            "max_duration": duration, "run_name": name, "save_folder": str(tmp_path / name / "ckpt"),
            "save_interval": "3ba", "loggers.jsonl.path": str(tmp_path / name / "m.jsonl")})

    straight = run(*overrides("straight", "6ba"))
    first = run(*overrides("resumed", "3ba"))
    assert os.path.exists(tmp_path / "resumed" / "ckpt" / "latest-rank0.pt")
    resumed = run(*overrides("resumed", "6ba"))          # same command, longer: autoresume picks up at 3ba
    assert first.state.timestamp.batch.value == 3 and resumed.state.timestamp.batch.value == 6

    a = straight.state.model.model.state_dict()
    b = resumed.state.model.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = read_losses(str(tmp_path / "straight" / "m.jsonl"))
    lb = read_losses(str(tmp_path / "resumed" / "m.jsonl"))
    assert [s for s, _ in lb] == [0, 1, 2, 3, 4, 5] and la == lb


def test_eval_metrics_hf_checkpointer_and_wandb_offline(copy_data, tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    data = fresh_copy(copy_data, tmp_path, "data")
    jsonl = str(tmp_path / "m.jsonl")
    base = tiny_overrides(data, tiny_tokenizer_dir, max_duration="4ba", **{
        "loggers.jsonl.path": jsonl, "loggers.wandb.project": "llmfoundry-lite-test",
        "callbacks.hf_checkpointer.save_folder": str(tmp_path / "hf"),
        "callbacks.hf_checkpointer.save_interval": "2ba", "eval_interval": "2ba",
        "device_eval_batch_size": 16})
    base = [o for o in base if not o.startswith("eval_loader=")]
    run(*base, f"eval_loader.dataset.max_seq_len={ROW}")

    rows = [__import__("json").loads(line) for line in open(jsonl)]
    evals = [r for r in rows if "metrics/eval/LanguageCrossEntropy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(k in evals[0] for k in ("metrics/eval/LanguagePerplexity", "metrics/eval/MaskedAccuracy"))
    assert any("throughput/device/mfu" in r for r in rows) and any("throughput/tokens_per_sec" in r for r in rows)
    # the train cross-entropy is the loss itself (taken from it, not recomputed from the logits)
    train = [r for r in rows if "metrics/train/LanguageCrossEntropy" in r]
    losses = dict(read_losses(jsonl))
    assert len(train) == 4 and all("metrics/train/MaskedAccuracy" in r for r in train)
    assert all(abs(r["metrics/train/LanguageCrossEntropy"] - losses[r["step"]]) < 1e-5 for r in train)

    from transformers import AutoModelForCausalLM
    assert sorted(os.listdir(tmp_path / "hf")) == ["ba2", "ba4"]
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf" / "ba4"))
    assert hf.config.n_layers == 2

    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1 and glob.glob(os.path.join(runs[0], "run-*.wandb"))
