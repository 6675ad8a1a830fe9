"""`icl_tasks` in a training YAML: Composer evaluators run at eval_interval, log llm-foundry's metric
names, and agree with the standalone evaluation of the final weights."""
import json
import os

import pytest

from train_utils import ROW, tiny_overrides, write_copy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "yamls", "pretrain", "mpt-tiny-cpu.yaml")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_icl_tasks_run_as_evaluators_during_training(tmp_path, tiny_tokenizer_dir):
    from llmfoundry_lite import train
    from llmfoundry_lite.eval.icl import evaluate_icl_task
    from llmfoundry_lite.icl.tasks import ICLTaskConfig

    data = write_copy_task(str(tmp_path / "data"), n_train=64, n_val=16)
    rows = [{"query": f"The {w} is", "choices": ["red", "blue"], "gold": i % 2} for i, w in
            enumerate(["door", "sky", "apple", "sea", "box"])]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"label": "mc", "dataset_uri": str(tmp_path / "mc.jsonl"), "icl_task_type": "multiple_choice",
            "num_fewshot": [0, 1]}
    (tmp_path / "tasks.yaml").write_text(json.dumps({"icl_tasks": [task]}))
    jsonl = str(tmp_path / "m.jsonl")
    trainer = train(TINY_YAML, tiny_overrides(data, tiny_tokenizer_dir, max_duration="4ba", eval_interval="2ba",
                                              device_eval_batch_size=2,
                                              **{"icl_tasks": str(tmp_path / "tasks.yaml"),
                                                 "loggers.jsonl.path": jsonl}))
    trainer.close()
    logged = [json.loads(line) for line in open(jsonl)]
    model, tok = trainer.state.model.model, trainer.state.model.tokenizer
    expected = evaluate_icl_task(model, tok, ICLTaskConfig(**task), max_seq_len=ROW, batch_size=2)
    for k in (0, 1):  # each evaluator logs its own row
        key = f"metrics/mc/{k}-shot/InContextLearningMultipleChoiceAccuracy"
        evals = [r for r in logged if key in r]
        assert [r["step"] for r in evals] == [2, 4]
        assert evals[-1][key] == pytest.approx(expected[f"mc/{k}-shot"])
