"""Golden numbers: the tiny model's per-step training losses (fp32, CPU, fixed seed and data) against
a recorded curve, so a refactor that changes the numerics (init, attention, loss, optimizer, data
order) is caught even when the run still "learns". After an intended change, regenerate the file with
`LLMF_WRITE_GOLDEN=1 pytest tests/test_golden_losses.py` and say why in the commit.

Tolerance 1e-4 absolute on losses of ~6-7: the same code gives the same losses to ~1e-7 here; other
x86 CPUs (other SIMD kernels) may differ in the last bits, never by 1e-4."""
import json
import os

import pytest

from train_utils import TINY_YAML, read_losses, tiny_overrides, write_copy_task

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "mpt-tiny-cpu-losses.json")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tiny_model_loss_curve_equals_the_golden_file(tmp_path, tiny_tokenizer_dir):
    from llmfoundry_lite import train
    data = write_copy_task(str(tmp_path / "data"))
    metrics = str(tmp_path / "m.jsonl")
    train(TINY_YAML, tiny_overrides(data, tiny_tokenizer_dir, **{
        "max_duration": "12ba", "loggers.jsonl.path": metrics})).close()
    losses = [round(loss, 6) for _, loss in read_losses(metrics)]
    if os.environ.get("LLMF_WRITE_GOLDEN"):
        with open(GOLDEN, "w") as f:
            json.dump({"config": "yamls/pretrain/mpt-tiny-cpu.yaml + tests/train_utils.tiny_overrides, 12ba",
                       "losses": losses}, f, indent=1)
    golden = json.load(open(GOLDEN))["losses"]
    assert len(losses) == len(golden) == 12
    assert max(abs(a - b) for a, b in zip(losses, golden, strict=True)) < 1e-4, (losses, golden)
