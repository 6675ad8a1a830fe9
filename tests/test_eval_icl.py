"""ICL task formats, prompts and metrics against hand-computed values, with a stub model whose logits
are a fixed bigram table (the logits at a position depend only on the token there)."""
import json

import pytest
import torch

from llmfoundry_lite.config import check
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.eval.icl import evaluate_icl_task
from llmfoundry_lite.icl.tasks import (
    ICLDataset,
    ICLTaskConfig,
    build_prompts,
    continuation_scores,
    fewshot_indices,
    judge_generations,
    load_task_file,
    normalize_answer,
)
from llmfoundry_lite.registry import icl_tasks

pytestmark = pytest.mark.usefixtures("torch_one_thread")

V = 128  # character vocabulary: token id = ord(char); 0 is EOS and pad


class CharTokenizer:
    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False, verbose=True):
        return {"input_ids": [ord(c) for c in text]}

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(chr(i) for i in r if i) for r in rows]


class BigramModel(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def table(**edges):
    """A bigram table: zeros, plus edges like ab=3.0 (logit 3 for 'b' after 'a')."""
    t = torch.zeros(V, V)
    for pair, value in edges.items():
        t[ord(pair[0]), ord(pair[1])] = value
    return t


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(p)


def cfg(path, kind, **kw):
    return ICLTaskConfig(label="t", dataset_uri=path, icl_task_type=kind, **kw)


def nll(t, prev, tok):
    return -torch.log_softmax(t[ord(prev)], -1)[ord(tok)].item()


def test_multiple_choice_uses_length_normalised_loss(tmp_path):
    # After ':' the table prefers 'y' (logit 3) over 'x' (logit 1); after 'y' everything is uniform.
    t = table(**{":y": 3.0, ":x": 1.0})
    loss_x = nll(t, ":", "x")
    mean_yy = (nll(t, ":", "y") + nll(t, "y", "y")) / 2
    assert mean_yy < loss_x < 2 * mean_yy  # normalised picks "yy", a plain sum would pick "x"
    path = write(tmp_path, "mc.jsonl", [{"query": "q", "choices": ["x", "yy"], "gold": 1},
                                        {"query": "r", "choices": ["x", "yy"], "gold": 0},
                                        {"query": "s", "choices": ["yy", "x", "zzz"], "gold": 0}])
    res = evaluate_icl_task(BigramModel(t), CharTokenizer(), cfg(path, "multiple_choice", continuation_delimiter=":"),
                            max_seq_len=32, batch_size=2)
    assert res == {"t/0-shot": pytest.approx(2 / 3)}


def test_per_row_scores_equal_hand_computed_losses(tmp_path):
    t = table(**{":y": 3.0, ":x": 1.0, "yz": 2.0})
    path = write(tmp_path, "mc.jsonl", [{"query": "q", "choices": ["x", "yz", "yyy"], "gold": 1}])
    ds = ICLDataset(cfg(path, "multiple_choice", continuation_delimiter=":"), 0, CharTokenizer(), max_seq_len=32)
    batch = ds.collate(ds.items)
    mean_loss, greedy_ok = continuation_scores(BigramModel(t)(batch["input_ids"]).logits, batch)
    expected = [nll(t, ":", "x"), (nll(t, ":", "y") + nll(t, "y", "z")) / 2,
                (nll(t, ":", "y") + 2 * nll(t, "y", "y")) / 3]
    assert mean_loss.tolist() == pytest.approx(expected, rel=1e-5)
    assert greedy_ok.tolist() == [False, True, False]


def test_language_modeling_is_greedy_exact_match(tmp_path):
    t = table(**{" 4": 5.0, "4.": 5.0, " 5": 1.0})  # greedy continues ' ' with '4', then '.'
    path = write(tmp_path, "lm.jsonl", [{"context": "2+2=", "continuation": "4."},
                                        {"context": "2+3=", "continuation": "5."},   # '5' is not the argmax
                                        {"context": "1+3=", "continuation": "4"},    # one token, matches
                                        {"context": "0+4=", "continuation": "4!"}])  # '!' is not the argmax
    res = evaluate_icl_task(BigramModel(t), CharTokenizer(), cfg(path, "language_modeling"), max_seq_len=32,
                            batch_size=3)
    assert res["t/0-shot"] == pytest.approx(2 / 4)


def test_schema_picks_the_context_that_best_predicts_the_continuation(tmp_path):
    t = table(**{"az": 2.0, "bz": 0.5})  # the continuation "z" follows a context ending in 'a' best
    path = write(tmp_path, "schema.jsonl", [{"context_options": ["xb", "xa"], "continuation": "z", "gold": 1},
                                            {"context_options": ["xb", "xa"], "continuation": "z", "gold": 0}])
    res = evaluate_icl_task(BigramModel(t), CharTokenizer(), cfg(path, "schema", continuation_delimiter=""),
                            max_seq_len=32, batch_size=1)
    assert res["t/0-shot"] == 0.5


def test_generation_answer_is_a_normalised_prefix(tmp_path):
    # Greedy after '=': 'T','h','e',' ','4','\n' ... ; "The 4" normalises to "4".
    t = table(**{"=T": 9, "Th": 9, "he": 9, "e ": 9, " 4": 9, "4\n": 9, "\nx": 9, "x\x00": 9})
    path = write(tmp_path, "gen.jsonl", [{"context": "2+2", "answer": "4"},
                                         {"context": "1+4", "answer": "5", "aliases": ["five", "the 4!"]},
                                         {"context": "2+3", "answer": "5"}])
    c = cfg(path, "generation_task_with_answers", continuation_delimiter="=", max_new_tokens=8)
    res = evaluate_icl_task(BigramModel(t), CharTokenizer(), c, max_seq_len=32, batch_size=2)
    assert res["t/0-shot"] == pytest.approx(2 / 3)
    assert normalize_answer("  The Answer,  is: AN apple! ") == "answer is apple"
    assert normalize_answer("U.S._open ‘An’") == "u s open"  # punctuation and '_' become spaces


def test_fewshot_prompt_string_and_sampling(tmp_path):
    rows = [{"context": "one", "continuation": "1"}, {"context": "two", "continuation": "2"}]
    path = write(tmp_path, "two.jsonl", rows)
    c = cfg(path, "language_modeling", prompt_string="Numbers:", example_delimiter="\n\n",
            continuation_delimiter=" -> ")
    prompts = build_prompts(rows, icl_tasks.get("language_modeling")(), c, num_fewshot=1)
    assert prompts[0] == [("Numbers:\n\ntwo -> 2\n\none -> ", "1")]
    assert prompts[1] == [("Numbers:\n\none -> 1\n\ntwo -> ", "2")]
    # a shot is never the example itself; the draw is fixed by the seed and differs across seeds
    draws = [fewshot_indices(20, i, 3, seed=7) for i in range(20)]
    assert all(i not in d and len(set(d)) == 3 for i, d in enumerate(draws))
    assert draws == [fewshot_indices(20, i, 3, seed=7) for i in range(20)]
    assert draws != [fewshot_indices(20, i, 3, seed=8) for i in range(20)]
    with pytest.raises(DataError, match="num_fewshot 2 needs at least 3 examples"):
        build_prompts(rows, icl_tasks.get("language_modeling")(), c, num_fewshot=2)


def test_multiple_choice_fewshot_shot_uses_the_gold_choice(tmp_path):
    rows = [{"query": "Q1", "choices": ["a", "b"], "gold": 1}, {"query": "Q2", "choices": ["c", "d"], "gold": 0}]
    c = cfg(write(tmp_path, "mc.jsonl", rows), "multiple_choice", continuation_delimiter="? ")
    prompts = build_prompts(rows, icl_tasks.get("multiple_choice")(), c, num_fewshot=1)
    assert prompts[1] == [("Q1? b\nQ2? ", "c"), ("Q1? b\nQ2? ", "d")]


def test_left_truncation_and_batching_do_not_change_scores(tmp_path):
    t = table(**{" 4": 5.0, "4.": 5.0})
    rows = [{"context": "long context " * 5 + "2+2=", "continuation": "4."}, {"context": "x=", "continuation": "4."},
            {"context": "y=", "continuation": "5."}]
    c = cfg(write(tmp_path, "lm.jsonl", rows), "language_modeling")
    ds = ICLDataset(c, 0, CharTokenizer(), max_seq_len=10)
    assert max(len(r) for it in ds.items for r in it.rows) == 10
    assert "".join(map(chr, ds.items[0].rows[0])) == ("long context " * 5 + "2+2= 4.")[-10:]
    b = ds.collate(ds.items)
    assert b["input_ids"].shape == (3, 10) and b["attention_mask"].sum().item() == 10 + 5 + 5
    scores = [evaluate_icl_task(BigramModel(t), CharTokenizer(), c, max_seq_len=n, batch_size=bs)["t/0-shot"]
              for n, bs in ((10, 1), (10, 3), (64, 2))]
    assert scores == [pytest.approx(2 / 3)] * 3


def test_bpe_tokenizer_moves_the_space_onto_the_continuation(tmp_path, tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    rows = [{"context": "The default value", "continuation": "is"}, {"context": "a", "continuation": "b"}]
    ds = ICLDataset(cfg(write(tmp_path, "lm.jsonl", rows), "language_modeling"), 0, tok, max_seq_len=64)
    item = next(it for it in ds.items if len(it.rows[0]) > 3)
    assert item.rows[0] == tok("The default value is")["input_ids"]
    assert item.rows[0][-item.cont_lens[0]:] == tok(" is")["input_ids"]


@pytest.mark.parametrize("line, message", [
    ('{"query": "q", "choices": ["a"], "gold": 0', "not valid JSON"),
    ('{"query": "q", "gold": 0}', "missing field 'choices'"),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}', "field 'gold' must index 'choices' (0..1), got 2"),
    ('{"query": "q", "choices": ["a", "b"], "gold": "1"}', "field 'gold' must be int, got str"),
    ('{"query": "q", "choices": [], "gold": 0}', "field 'choices' must be a non-empty list of strings"),
    ('["q"]', "expected a JSON object"),
])
def test_malformed_task_file_names_file_line_and_field(tmp_path, line, message):
    path = write(tmp_path, "bad.jsonl", ['{"query": "ok", "choices": ["a", "b"], "gold": 0}', "", line])
    with pytest.raises(DataError) as e:
        load_task_file(path, icl_tasks.get("multiple_choice")())
    assert f"{path}:3: " in str(e.value) and message in str(e.value)


def test_task_config_problems_are_all_reported(tmp_path):
    _, problems = check(ICLTaskConfig, {"label": "x", "dataset_uri": str(tmp_path / "nope.jsonl"),
                                        "icl_task_type": "multiple_choise", "num_fewshot": [0, -1],
                                        "continuation_delimter": " "}, "icl_tasks[0]")
    text = "\n".join(problems)
    assert "icl_tasks[0].continuation_delimter: unknown key (did you mean 'continuation_delimiter'?)" in text
    _, problems = check(ICLTaskConfig, {"label": "x", "dataset_uri": str(tmp_path / "nope.jsonl"),
                                        "icl_task_type": "multiple_choise", "num_fewshot": [0, -1]}, "icl_tasks[0]")
    text = "\n".join(problems)
    assert "did you mean 'multiple_choice'" in text and "num_fewshot[1]: must be >= 0" in text
    assert "dataset_uri: file not found" in text and len(problems) == 3


def test_plugin_task_type_via_registry(tmp_path):
    from llmfoundry_lite.icl.tasks import ICLTaskType

    class Yes(ICLTaskType):  # correct when the continuation "yes" beats "no"
        name, fields = "yes_no_test", {"question": str}

        def requests(self, ex, c):
            return [(ex["question"] + " ", "yes"), (ex["question"] + " ", "no")]

    icl_tasks.register("yes_no_test", Yes)
    path = write(tmp_path, "yn.jsonl", [{"question": "ok?"}])
    res = evaluate_icl_task(BigramModel(table(**{" y": 4.0})), CharTokenizer(), cfg(path, "yes_no_test"), 16, 4)
    assert res == {"t/0-shot": 1.0}


def test_split_examples_keeps_each_examples_rows_together(tmp_path):
    from llmfoundry_lite.icl.tasks import judge_generations, judge_logits, split_examples
    t = table(**{":y": 3.0, ":x": 1.0})
    path = write(tmp_path, "mc.jsonl", [{"query": q, "choices": ["x", "yy", "z"][:n], "gold": g}
                                        for q, n, g in (("q", 2, 1), ("rr", 3, 0), ("s", 3, 1))])
    ds = ICLDataset(cfg(path, "multiple_choice", continuation_delimiter=":"), 0, CharTokenizer(), max_seq_len=32)
    whole = ds.collate(ds.items)
    pieces = split_examples(whole, 2)
    assert [len(p["gold"]) for p in pieces] == [2, 1] and [len(p["input_ids"]) for p in pieces] == [5, 3]  # sorted: rr, q | s
    model = BigramModel(t)
    judged = [ok for p in pieces for ok in judge_logits(model(p["input_ids"]).logits, p)]
    assert judged == judge_logits(model(whole["input_ids"]).logits, whole) == [False, True, True]
    gen = {"mode": "generate", "labels": [["a"], ["b"], ["c"]], "input_ids": torch.zeros(3, 2),
           "early_stopping_criteria": ["\n"], "cot_delimiter": "", "do_normalization": True,
           "attention_mask": torch.ones(3, 2)}
    assert [p["labels"] for p in split_examples(gen, 2)] == [[["a"], ["b"]], [["c"]]]
    assert judge_generations(["A\nb", " the b", "d"], gen) == [True, True, False]


# ---- llm-foundry's task keys: prelimiter, chain of thought, early stopping, normalisation, categories ----


def test_prelimiter_and_chain_of_thought_shape_the_prompt_as_llm_foundry(tmp_path):
    rows = [{"context": "2+2", "answer": "4", "chain_of_thought": "two and two."},
            {"context": "1+1", "answer": "2", "chain_of_thought": "one and one."}]
    c = cfg(write(tmp_path, "cot.jsonl", rows), "question_answering", question_prelimiter="Q: ",
            continuation_delimiter="\nA: ", cot_delimiter=" So ")
    prompts = build_prompts(rows, icl_tasks.get("question_answering")(), c, num_fewshot=1)
    assert prompts[0] == [("Q: 1+1\nA: one and one. So 2\nQ: 2+2\nA: ", "two and two. So 4")]


def generation_batch(tmp_path, **kw):
    """A collated batch of a one-example generation task (answer '42', alias 'forty two')."""
    path = write(tmp_path, "g.jsonl", [{"context": "q", "answer": "42", "aliases": ["forty two"]}])
    ds = ICLDataset(cfg(path, "generation_task_with_answers", **kw), 0, CharTokenizer(), max_seq_len=64)
    return ds.collate(ds.items)


@pytest.mark.parametrize("text, kw, correct", [
    # cut at the first early-stopping match, then the text after the last cot_delimiter, then startswith
    ("Think. The answer is 42\n\nQuestion: The answer is 7", dict(cot_delimiter="The answer is "), True),
    ("The answer is 4Question: 42", dict(cot_delimiter="The answer is "), False),
    ("42 apples", {}, True),                                    # a prefix is enough
    ("4 2", {}, False),
    ("The 42!", {}, True),                                      # normalised: article and punctuation go
    ("The 42!", dict(do_normalization=False), False),           # not normalised: only stripped
    ("  42 \n", dict(do_normalization=False), True),
    ("Forty_two.", {}, True),                                   # '_' is a space, an alias matches
    ("forty two", dict(early_stopping_criteria=["t[wy]"]), False),  # the criteria are regular expressions
])
def test_generation_judged_as_llm_foundry(tmp_path, text, kw, correct):
    criteria = kw.pop("early_stopping_criteria", ["\n\n", "Question:"])
    batch = generation_batch(tmp_path, early_stopping_criteria=criteria, **kw)
    assert judge_generations([text], batch) == [correct]


class CountingModel(BigramModel):
    calls = 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        return super().forward(input_ids, attention_mask)


def test_generation_stops_at_an_early_stopping_criterion(tmp_path):
    # greedy after ':' writes ' 7\n\n\n...' and never EOS: 12 steps without criteria, 4 (' 7\n\n') with
    t = table(**{": ": 9, " 7": 9, "7\n": 9, "\n\n": 9})
    path = write(tmp_path, "g.jsonl", [{"context": "3+4", "answer": "7"}])
    for criteria, steps in ((None, 12), (["\n\n"], 4)):
        model = CountingModel(t)
        c = cfg(path, "generation_task_with_answers", continuation_delimiter=":", max_new_tokens=12,
                early_stopping_criteria=criteria)
        assert evaluate_icl_task(model, CharTokenizer(), c, max_seq_len=32, batch_size=1) == {"t/0-shot": 1.0}
        assert model.calls == steps


def test_categories_are_scored_apart_and_averaged(tmp_path):
    # greedy continues ' ' with '4': the examples answering '4' are right
    t = table(**{" 4": 5.0})
    rows = [{"context": "2+2=", "continuation": "4", "category": "b"},
            {"context": "2+3=", "continuation": "5", "category": "a"},
            {"context": "1+3=", "continuation": "4", "category": "a"}]
    c = cfg(write(tmp_path, "cat.jsonl", rows), "language_modeling", has_categories=True)
    res = evaluate_icl_task(BigramModel(t), CharTokenizer(), c, max_seq_len=32, batch_size=2)
    # the mean of the categories (0.5 and 1.0), not the pooled 2/3, as llm-foundry reports it
    assert res == {"t/0-shot/a": 0.5, "t/0-shot/b": 1.0, "t/0-shot": 0.75}
    from llmfoundry_lite.icl.tasks import task_datasets
    name, ds = next(task_datasets(cfg(c.dataset_uri, "language_modeling", has_categories=True, num_fewshot=1),
                                  CharTokenizer(), 64))
    prompts = ["".join(map(chr, it.rows[0])) for it in ds.items]
    assert name == "t/1-shot/a" and sorted(prompts) == ["1+3= 4\n2+3= 5", "2+3= 5\n1+3= 4"]  # shots: own category
    path = write(tmp_path, "nocat.jsonl", [{"context": "x", "continuation": "y"}])
    with pytest.raises(DataError, match="nocat.jsonl:1: .*string field 'category'"):
        evaluate_icl_task(BigramModel(t), CharTokenizer(), cfg(path, "language_modeling", has_categories=True), 32, 1)


def test_llm_foundry_task_keys_are_checked(tmp_path):
    path = write(tmp_path, "g.jsonl", [{"context": "q", "answer": "a"}])
    base = {"label": "x", "dataset_uri": path, "num_fewshot": [0]}
    ok, problems = check(ICLTaskConfig, {**base, "icl_task_type": "question_answering", "prelimiter": "Q: ",
                                         "metric_names": ["InContextLearningGenerationExactMatchAccuracy"],
                                         "cot_delimiter": "So ", "do_normalization": False}, "t")
    assert problems == [] and ok.question_prelimiter == "Q: "
    _, problems = check(ICLTaskConfig, {**base, "icl_task_type": "code_evaluation"}, "t")
    assert problems == ["t.icl_task_type: 'code_evaluation' runs the code the model writes, which needs a sandbox "
                        "this framework does not have; remove the task (llm-foundry runs it in a sandbox)"]
    _, problems = check(ICLTaskConfig, {**base, "icl_task_type": "multiple_choice",
                                        "metric_names": ["InContextLearningLMExpectedCalibrationError"]}, "t")
    assert len(problems) == 1 and "t.metric_names: ['InContextLearningLMExpectedCalibrationError'] is not " \
        "computed here; a multiple_choice task reports [InContextLearningMultipleChoiceAccuracy]" in problems[0]
    _, problems = check(ICLTaskConfig, {**base, "icl_task_type": "question_answering", "dataset_uri": "hf://a/b",
                                        "hf_loading_vars": {"split": "test"}}, "t")
    assert [p.split(":")[0] for p in problems] == ["t.dataset_uri", "t.hf_loading_vars"]
    assert all("tasks are read from local JSONL files here (nothing is downloaded)" in p for p in problems)
