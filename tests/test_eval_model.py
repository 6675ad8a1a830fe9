"""ICL evaluation on a real tiny MPT: finetuning on a synthetic task raises its score, batching
and padding do not change scores, and Composer evaluators report what the standalone loop does."""
import json

import pytest
import torch

from llmfoundry_lite.eval.icl import evaluate_icl_task
from llmfoundry_lite.icl.tasks import ICLDataset, ICLTaskConfig, continuation_scores
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")

FACTS = {"Ann": "red", "Bob": "blue", "Cid": "green", "Dee": "red", "Eli": "blue", "Fay": "green"}
COLOURS = ["red", "blue", "green"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    t.pad_token = t.pad_token or t.eos_token
    return t


def tiny_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=len(tok), no_bias=True)
    return MPTForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    files = {
        "mc": [{"query": f"{n} likes", "choices": COLOURS, "gold": COLOURS.index(c)} for n, c in FACTS.items()],
        "lm": [{"context": f"{n} likes", "continuation": c} for n, c in FACTS.items()],
        "gen": [{"context": f"{n} likes", "answer": c, "aliases": [c.upper()]} for n, c in FACTS.items()],
    }
    out = {}
    for name, rows in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[name] = str(root / f"{name}.jsonl")
    return out


def tasks(task_files, num_fewshot=0):
    kinds = {"mc": "multiple_choice", "lm": "language_modeling", "gen": "generation_task_with_answers"}
    return [ICLTaskConfig(label=k, dataset_uri=task_files[k], icl_task_type=kinds[k], num_fewshot=[num_fewshot])
            for k in kinds]


def score_all(model, tok, task_files, batch_size=4):
    out = {}
    for t in tasks(task_files):
        out.update(evaluate_icl_task(model, tok, t, max_seq_len=64, batch_size=batch_size))
    return out


def test_finetuned_model_scores_higher_than_its_untrained_self(tok, task_files):
    model = tiny_model(tok)
    before = score_all(model, tok, task_files)
    enc = tok([f"{n} likes {c}{tok.eos_token}" for n, c in FACTS.items()], padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(80):
        loss = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score_all(model.eval(), tok, task_files)
    assert loss.item() < 0.5
    assert after == {"mc/0-shot": 1.0, "lm/0-shot": 1.0, "gen/0-shot": 1.0}, (before, after)
    assert sum(before.values()) < 2.0, before  # far below: the untrained model guesses


def test_batching_and_padding_do_not_change_scores(tok, task_files):
    model = tiny_model(tok, seed=1)
    cfg = ICLTaskConfig(label="mc", dataset_uri=task_files["mc"], icl_task_type="multiple_choice")
    ds = ICLDataset(cfg, 2, tok, max_seq_len=64)  # 2 shots: prompts of different lengths
    whole = ds.collate(ds.items)
    assert (whole["attention_mask"] == 0).any()  # some rows are padded
    losses = continuation_scores(model(input_ids=whole["input_ids"], attention_mask=whole["attention_mask"]).logits,
                                 whole)[0]
    one_by_one = torch.cat([continuation_scores(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
                                                .logits, b)[0] for b in ds.batches(1)])
    torch.testing.assert_close(losses, one_by_one, rtol=1e-4, atol=1e-5)
    for t in tasks(task_files, num_fewshot=2):  # generation uses left padding
        assert (evaluate_icl_task(model, tok, t, 64, batch_size=1) == evaluate_icl_task(model, tok, t, 64, batch_size=6))


def test_composer_evaluators_match_the_standalone_numbers(tok, task_files, tmp_path):
    from composer import Trainer

    from llmfoundry_lite.training.icl_evaluators import add_icl_metrics, build_icl_evaluators
    from llmfoundry_lite.training.objectives.crossentropy import ComposerMPTCausalLM

    model = tiny_model(tok, seed=2)
    cfgs = [{"label": t.label, "dataset_uri": t.dataset_uri, "icl_task_type": t.icl_task_type, "num_fewshot": [0, 1]}
            for t in tasks(task_files)]
    cfgs[0]["batch_size"] = 4  # 6 examples: a last batch of 2
    expected = {}
    for c in cfgs:
        expected.update(evaluate_icl_task(model, tok, ICLTaskConfig(**c), max_seq_len=64, batch_size=3))
    composer_model = ComposerMPTCausalLM(model, tok)
    add_icl_metrics(composer_model)
    evaluators = build_icl_evaluators([ICLTaskConfig(**c) for c in cfgs], tok, device_eval_batch_size=3, max_seq_len=64)
    assert [e.label for e in evaluators] == ["mc/0-shot", "mc/1-shot", "lm/0-shot", "lm/1-shot", "gen/0-shot",
                                             "gen/1-shot"]
    trainer = Trainer(model=composer_model, eval_dataloader=evaluators, device="cpu", progress_bar=False,
                      log_to_console=False, save_folder=None)
    trainer.eval()
    names = {"mc": "InContextLearningMultipleChoiceAccuracy", "lm": "InContextLearningLMAccuracy",
             "gen": "InContextLearningGenerationExactMatchAccuracy"}
    got = {label: trainer.state.eval_metrics[label][names[label.split("/")[0]]].compute().item()
           for label in expected}
    assert got == pytest.approx(expected)
