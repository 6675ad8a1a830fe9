"""`evaluate(cfg)` / `llmfoundry-lite eval`: models from config sections, Composer checkpoints and HF
folders; perplexity against a hand computation; console table, JSON/CSV files, loggers; config errors."""
import csv
import json
import math
import warnings

import pytest
import torch

from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import CheckpointError, ConfigError
from llmfoundry_lite.eval.runner import evaluate, perplexity

from train_utils import ROW, copy_rows, write_copy_task

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def model_section(d_model=32):
    return {"name": "mpt_causal_lm", "d_model": d_model, "n_heads": 2, "n_layers": 2, "max_seq_len": 64}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("tasks") / "mc.jsonl"
    rows = [{"query": f"The {w} is", "choices": ["red", "blue", "open"], "gold": i % 3} for i, w in
            enumerate(["door", "sky", "apple", "sea", "box", "book"])]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def base_cfg(tmp_path, tiny_tokenizer_dir, task_file, **kw):
    cfg = {"max_seq_len": 64, "device_eval_batch_size": 4, "device": "cpu", "progress_bar": False,
           "results_path": str(tmp_path / "results"),
           "models": [{"model_name": "small", "model": model_section(32), "tokenizer": {"name": tiny_tokenizer_dir}},
                      {"model_name": "wider", "model": model_section(64), "tokenizer": {"name": tiny_tokenizer_dir}}],
           "icl_tasks": [{"label": "mc", "dataset_uri": task_file, "icl_task_type": "multiple_choice",
                          "num_fewshot": [0, 2]}]}
    cfg.update(kw)
    return cfg


def test_perplexity_is_token_weighted_cross_entropy():
    torch.manual_seed(0)
    table = torch.randn(10, 10)

    class Bigram(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": table[input_ids]})()

    batches = [{"input_ids": torch.tensor([[1, 2, 3, 4]]), "labels": torch.tensor([[1, 2, 3, 4]])},
               {"input_ids": torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]]),
                "labels": torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])}]
    pairs = [(1, 2), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9)]  # (previous token, predicted token)
    ce = sum(-torch.log_softmax(table[a], -1)[b].item() for a, b in pairs) / len(pairs)
    out = perplexity(Bigram(), batches, "cpu")
    assert out["tokens"] == 6 and out["cross_entropy"] == pytest.approx(ce, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(ce), rel=1e-5)
    assert perplexity(Bigram(), batches, "cpu", max_batches=1)["tokens"] == 3


def test_several_models_give_tables_and_json_csv_files(tmp_path, tiny_tokenizer_dir, task_file, capsys):
    cfg = base_cfg(tmp_path, tiny_tokenizer_dir, task_file,
                   loggers={"jsonl": {"path": str(tmp_path / "log.jsonl")}})
    results = evaluate(cfg)
    assert list(results) == ["small", "wider"] and list(results["small"]) == ["mc/0-shot", "mc/2-shot"]
    assert all(0.0 <= v <= 1.0 and (v * 6) == round(v * 6) for m in results.values() for v in m.values())
    out = capsys.readouterr().out
    assert "== small ==" in out and "== wider ==" in out and "| mc/2-shot" in out
    assert json.loads((tmp_path / "results" / "results.json").read_text()) == results
    rows = list(csv.reader((tmp_path / "results" / "results.csv").open()))
    assert rows[0] == ["model_name", "mc/0-shot", "mc/2-shot"] and [r[0] for r in rows[1:]] == ["small", "wider"]
    assert float(rows[2][2]) == pytest.approx(results["wider"]["mc/2-shot"])
    logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert logged["metrics/wider/mc/0-shot"] == pytest.approx(results["wider"]["mc/0-shot"])
    # the same seed builds the same weights: a second run gives the same numbers
    assert evaluate(cfg, ["results_path=null", "loggers={}"]) == results


def test_single_model_shorthand_and_icl_tasks_from_a_yaml_file(tmp_path, tiny_tokenizer_dir, task_file):
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"icl_tasks:\n- label: mc\n  dataset_uri: {task_file}\n  icl_task_type: multiple_choice\n")
    y = tmp_path / "eval.yaml"
    y.write_text(f"max_seq_len: 64\ndevice: cpu\nresults_path: null\nprogress_bar: false\nicl_tasks: {tasks}\n"
                 f"model: {json.dumps(model_section())}\ntokenizer: {{name: {tiny_tokenizer_dir}}}\n")
    assert list(evaluate(str(y))) == ["model"]
    assert main(["eval", str(y), "model_name=renamed"]) == 0


def test_config_errors_are_all_reported_at_once(tmp_path, tiny_tokenizer_dir, task_file, capsys):
    cfg = base_cfg(tmp_path, tiny_tokenizer_dir, task_file, devce_eval_batch_size=2, precision="fp64")
    cfg["models"].append({"model_name": "small", "load_path": str(tmp_path / "missing.pt")})
    cfg["models"][1]["model"]["n_layer"] = 2
    cfg["icl_tasks"][0]["icl_task_type"] = "multi_choice"
    with pytest.raises(ConfigError) as e:
        evaluate(cfg)
    text = str(e.value)
    assert "devce_eval_batch_size: unknown key (did you mean 'device_eval_batch_size'?)" in text
    assert "precision: 'fp64' is not allowed" in text
    cfg.pop("devce_eval_batch_size"), cfg.pop("precision")
    with pytest.raises(ConfigError) as e:
        evaluate(cfg)
    text = str(e.value)
    for expected in ("models[2].load_path: not found", "models[1].model.n_layer", "model_name 'small' is used twice",
                     "icl_tasks[0].icl_task_type", "did you mean 'multiple_choice'"):
        assert expected in text, text
    y = tmp_path / "bad.yaml"
    y.write_text("max_seq_len: 64\nmodels: []\n")
    assert main(["eval", str(y)]) == 2
    err = capsys.readouterr().err
    assert "models: empty" in err and "nothing to evaluate" in err and "Traceback" not in err


def test_composer_checkpoint_and_hf_folder_give_the_same_numbers(tmp_path, tiny_tokenizer_dir, task_file):
    from composer import Trainer
    from transformers import AutoTokenizer

    from llmfoundry_lite.eval.icl import evaluate_icl_task
    from llmfoundry_lite.export import write_hf_folder
    from llmfoundry_lite.icl.tasks import ICLTaskConfig
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    from llmfoundry_lite.training.objectives.crossentropy import ComposerMPTCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(3)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=len(tok))).eval()
    task = ICLTaskConfig(label="mc", dataset_uri=task_file, icl_task_type="multiple_choice", num_fewshot=[0, 2])
    expected = evaluate_icl_task(model, tok, task, max_seq_len=64, batch_size=4)
    Trainer(model=ComposerMPTCausalLM(model, tok), device="cpu", progress_bar=False,
            log_to_console=False).save_checkpoint(str(tmp_path / "ckpt.pt"))
    write_hf_folder(model.config, model.state_dict(), str(tmp_path / "hf"), tokenizer=tok)
    # perplexity on an MDS split through the training eval_loader section, against the model's own loss
    data = write_copy_task(str(tmp_path / "data"), n_train=8, n_val=12)
    rows = torch.as_tensor(copy_rows(12, seed=1), dtype=torch.long)
    with torch.no_grad():
        expected["eval/cross_entropy"] = model(input_ids=rows, labels=rows).loss.item()
    expected["eval/perplexity"] = math.exp(expected["eval/cross_entropy"])
    expected["eval/tokens"] = 12 * (ROW - 1)
    cfg = base_cfg(tmp_path, tiny_tokenizer_dir, task_file, results_path=None, eval_loader={
        "name": "text", "dataset": {"local": data, "split": "val", "shuffle": False, "max_seq_len": ROW},
        "drop_last": False, "num_workers": 0})
    cfg["models"] = [{"model_name": "composer", "load_path": str(tmp_path / "ckpt.pt")},
                     {"model_name": "hf", "model": {"name": "hf_causal_lm",
                                                    "pretrained_model_name_or_path": str(tmp_path / "hf")}}]
    # llm-foundry's MPT eval YAML: the model section builds the model, load_path gives its weights
    cfg["models"].append({"model_name": "section", "model": model_section(32), "load_path": str(tmp_path / "ckpt.pt")})
    results = evaluate(cfg)
    assert results["composer"] == pytest.approx(expected, rel=1e-5)
    assert results["hf"] == pytest.approx(expected, rel=1e-5)
    assert results["section"] == pytest.approx(expected, rel=1e-5)
    cfg["models"] = [{"model_name": "other", "model": model_section(64), "load_path": str(tmp_path / "ckpt.pt")}]
    with pytest.raises(CheckpointError, match="size mismatch .*make `model` describe the checkpoint's model"):
        evaluate(cfg)


def test_training_yaml_accepts_icl_tasks_and_checks_them(task_file):
    from llmfoundry_lite.training.schema import TrainConfig, check_train_config

    assert "icl_tasks" in TrainConfig.__dataclass_fields__
    cfg = {"model": model_section(), "tokenizer": {"name": "gpt2"}, "max_seq_len": 64, "max_duration": "1ba",
           "global_train_batch_size": 2, "train_loader": {"name": "text", "dataset": {"local": "x", "split": "train"}},
           "icl_tasks": [{"label": "mc", "dataset_uri": task_file, "icl_task_type": "multiple_choice",
                          "num_fewsot": [0]}]}
    with pytest.raises(ConfigError, match=r"icl_tasks\[0\].num_fewsot: unknown key \(did you mean 'num_fewshot'\?\)"):
        check_train_config(cfg)


def test_shipped_eval_yamls_and_task_suite_validate(tmp_path, tiny_tokenizer_dir, monkeypatch):
    import os

    from transformers import AutoTokenizer

    from llmfoundry_lite.config import load_config, parse
    from llmfoundry_lite.eval.runner import check_eval_config
    from llmfoundry_lite.icl.tasks import ICLDataset, ICLTasks

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)  # task paths in the YAMLs are relative to the repository root
    out = tmp_path / "quickstart_out"
    (out / "checkpoints" / "mpt-tiny-cpu").mkdir(parents=True)
    (out / "checkpoints" / "mpt-tiny-cpu" / "latest-rank0.pt").touch()
    write_copy_task(str(out / "data"), n_train=4, n_val=4)
    (out / "tokenizer").mkdir()
    cfg = check_eval_config(load_config("yamls/eval/mpt-tiny.yaml", [f"variables.out={out}"]))
    assert [m.model_name for m in cfg.models] == ["mpt-tiny-trained", "mpt-tiny-untrained"]
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winograd_wsc", "triviaqa"):
        (bench / f"{name}.jsonl").touch()
    check_eval_config(load_config("yamls/eval/public-benchmarks.yaml", [f"variables.data={bench}",
                                                                        f"variables.model={tmp_path}"]))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tasks = parse(ICLTasks, "yamls/eval/tasks-tiny.yaml", "icl_tasks")
    assert len(tasks) == 4
    for t in tasks:
        for k in t.num_fewshot:
            assert len(ICLDataset(t, k, tok, max_seq_len=128)) == 100


def gauntlet(**kw):
    from llmfoundry_lite.config import parse
    from llmfoundry_lite.eval.gauntlet import GauntletConfig
    return parse(GauntletConfig, {"categories": [
        {"name": "reasoning", "benchmarks": [{"name": "a", "num_fewshot": 0, "random_baseline": 0.25},
                                             {"name": "b", "num_fewshot": 3, "random_baseline": 0.5}]},
        {"name": "knowledge", "benchmarks": [{"name": "c", "num_fewshot": 0, "random_baseline": 0}]},
        {"name": "unrun", "benchmarks": [{"name": "d", "num_fewshot": 0, "random_baseline": 0}]}], **kw})


def test_gauntlet_scores_as_llm_foundry_defines_them():
    from llmfoundry_lite.eval.gauntlet import gauntlet_scores
    acc = {"a/0-shot": 0.6, "b/3-shot": 0.5, "c/0-shot": 0.9, "a/3-shot": 0.0}
    sizes = {"a": 16, "b": 1, "c": 5}.__getitem__
    a, b = (0.6 - 0.25) / 0.75, (0.5 - 0.5) / 0.5  # baseline subtracted, rescaled to a maximum of 1
    with pytest.warns(UserWarning, match=r"category 'unrun' left out: no results for \['d/0-shot'\]"):
        out = gauntlet_scores(gauntlet(), acc, sizes)
    assert out == pytest.approx({"eval_gauntlet/reasoning": (a + b) / 2, "eval_gauntlet/knowledge": 0.9,
                                 "eval_gauntlet/default_average": ((a + b) / 2 + 0.9) / 2})
    def reasoning(**kw):
        with warnings.catch_warnings():  # the category left out, as above
            warnings.simplefilter("ignore")
            return gauntlet_scores(gauntlet(**kw), acc, sizes)

    assert reasoning(weighting="SAMPLE_SZ")["eval_gauntlet/reasoning"] == pytest.approx((16 * a + 1 * b) / 17)
    # log2 of the size, at least 1: log2(16) and log2(1) -> 1
    assert reasoning(weighting="LOG_SAMPLE_SZ")["eval_gauntlet/reasoning"] == pytest.approx((4 * a + 1 * b) / 5)
    assert reasoning(rescale_accuracy=False)["eval_gauntlet/reasoning"] == pytest.approx((0.6 - 0.25 + 0) / 2)
    assert reasoning(rescale_accuracy=False, subtract_random_baseline=False)["eval_gauntlet/reasoning"] == \
        pytest.approx((0.6 + 0.5) / 2)
    # as llm-foundry: an average skips categories without a score (or not defined at all)
    out = reasoning(averages={"core": ["reasoning", "knowledge", "programming"], "rest": ["unrun"]})
    assert out["eval_gauntlet/core"] == pytest.approx(((a + b) / 2 + 0.9) / 2) and out["eval_gauntlet/rest"] == 0
    assert "eval_gauntlet/default_average" not in out


def test_gauntlet_config_errors():
    with pytest.raises(ConfigError) as e:
        gauntlet(subtract_random_baseline=False, weighting="SAMPLE", averages={"knowledge": ["reasoning"]})
    text = str(e.value)
    for expected in ("rescale_accuracy: rescaling only makes sense after subtracting the random baseline",
                     "weighting: 'SAMPLE' is not allowed", "averages.knowledge: is also a category name"):
        assert expected in text, text


def test_llm_foundry_eval_yaml_keys(tmp_path, tiny_tokenizer_dir, task_file):
    from llmfoundry_lite.eval.gauntlet import gauntlet_scores
    from llmfoundry_lite.eval.runner import check_eval_config

    lines = open(task_file).read().splitlines(keepends=True)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"icl_tasks:\n- {{label: mc, dataset_uri: {task_file}, icl_task_type: multiple_choice, "
                     f"num_fewshot: [0, 2]}}\n- {{label: sub, dataset_uri: {task_file}, icl_task_type: multiple_choice,"
                     " num_fewshot: [0], batch_size: 2}\n")
    suite = tmp_path / "gauntlet.yaml"
    suite.write_text("eval_gauntlet:\n  weighting: EQUAL\n  categories:\n  - name: all\n    benchmarks:\n"
                     "    - {name: mc, num_fewshot: 2, random_baseline: 0.25}\n"
                     "    - {name: sub, num_fewshot: 0, random_baseline: 0.5}\n")
    cfg = base_cfg(tmp_path, tiny_tokenizer_dir, task_file, icl_tasks_str=str(tasks), eval_gauntlet_str=str(suite),
                   icl_subset_num_batches=1, precision="fp32", python_log_level="debug", console_log_interval="1ba",
                   dist_timeout=60, metadata={"owner": "me"}, log_config=True, callbacks={}, code_paths=[],
                   fsdp_config={"sharding_strategy": "FULL_SHARD", "mixed_precision": "FULL", "forward_prefetch": True,
                                "limit_all_gathers": True}, results_path=None)
    cfg.pop("icl_tasks")
    cfg["models"] = cfg["models"][:1]
    results = evaluate(cfg)["small"]
    # icl_subset_num_batches: 1 batch of each task (2 examples of `sub`; `mc` batches 4 of 6)
    from transformers import AutoTokenizer

    from llmfoundry_lite.eval.icl import evaluate_icl_task
    from llmfoundry_lite.icl.tasks import ICLTaskConfig
    from llmfoundry_lite.opening import open_model
    ec = check_eval_config(cfg)
    torch.manual_seed(ec.seed)
    model, tok = open_model(ec.models[0].model, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))
    first = tmp_path / "first.jsonl"
    for label, n in (("sub", 2), ("mc", 4)):
        first.write_text("".join(lines[:n]))
        task = ICLTaskConfig(label=label, dataset_uri=str(first), icl_task_type="multiple_choice")
        assert results[f"{label}/0-shot"] == evaluate_icl_task(model, tok, task, 64, 4)[f"{label}/0-shot"]
    expected = gauntlet_scores(check_eval_config(cfg).eval_gauntlet, results, len)
    assert expected["eval_gauntlet/all"] == pytest.approx(
        ((results["mc/2-shot"] - 0.25) / 0.75 + (results["sub/0-shot"] - 0.5) / 0.5) / 2)
    assert {k: results[k] for k in expected} == pytest.approx(expected)
    bad = dict(cfg, code_paths=["plugin.py"], callbacks={"eval_output_logging": {}}, icl_tasks_str=None)
    with pytest.raises(ConfigError) as e:
        evaluate(bad)
    text = str(e.value)
    for expected_problem in ("code_paths: not supported; plug-ins register through the `llmfoundry_lite.plugins`",
                             "callbacks: eval runs without a Composer Trainer here",
                             "eval_gauntlet: needs icl_tasks"):
        assert expected_problem in text, text


@pytest.mark.multiprocess
def test_two_ranks_with_fsdp2_give_the_one_process_scores(tmp_path, tiny_tokenizer_dir, task_file):
    """`composer -n 2 scripts/eval.py` with fsdp_config: each rank holds half the model, scores its share
    of every task (odd sizes: a rank scores a filler batch; generation lengths differ across ranks),
    and the scores equal one process's and the ones the tasks were built to give."""
    import os
    import re

    import yaml

    from train_utils import ROOT, launch

    cfg = base_cfg(tmp_path, tiny_tokenizer_dir, task_file, precision="fp32", device_eval_batch_size=2,
                   fsdp_config={"sharding_strategy": "FULL_SHARD"},
                   eval_loader={"name": "text", "dataset": {"local": write_copy_task(str(tmp_path / "data"), 4, 8),
                                                            "split": "val", "shuffle": False, "max_seq_len": ROW},
                                "drop_last": False, "num_workers": 0})
    cfg["models"] = cfg["models"][:1]
    # Tasks built from the model's own greedy choices: example i is right when i % 3 == 0, by construction
    from llmfoundry_lite.eval.runner import _open, check_eval_config
    torch.manual_seed(17)
    model, tok = _open(check_eval_config(cfg).models[0])
    lm, gen = [], []
    for i, w in enumerate(["door", "sky", "apple", "sea", "box", "cat", "tree", "road", "book", "lamp", "fish"]):
        ids = tok(f"The {w} is")["input_ids"]
        with torch.no_grad():
            ranked = model(input_ids=torch.tensor([ids])).logits[0, -1].argsort(descending=True).tolist()
        token = next(t for t in ranked[i % 3 != 0:] if tok(tok.decode([t]))["input_ids"] == [t])
        lm.append({"context": f"The {w} is", "continuation": tok.decode([token]), "category": "ab"[i % 2]})
        prompt = tok(f"Name the {w}:")["input_ids"]
        with torch.no_grad():
            for _ in range(4):
                prompt.append(int(model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()))
        text = re.split("\n", tok.decode(prompt[-4:]))[0]
        gen.append({"context": f"Name the {w}", "answer": text if i % 3 == 0 else "zq" + text})
    for name, rows in (("lm", lm), ("gen", gen)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["icl_tasks"] += [{"label": "lm", "dataset_uri": str(tmp_path / "lm.jsonl"), "icl_task_type": "language_modeling",
                          "continuation_delimiter": "", "has_categories": True},
                         {"label": "gen", "dataset_uri": str(tmp_path / "gen.jsonl"), "max_new_tokens": 4,
                          "icl_task_type": "question_answering", "continuation_delimiter": ":",
                          "early_stopping_criteria": ["\n"]}]
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    out = launch([os.path.join(ROOT, "scripts", "eval.py"), str(tmp_path / "eval.yaml"),
                  f"results_path={tmp_path / 'two'}"], str(tmp_path / "logs"))
    logs = out + (tmp_path / "logs" / "out1.txt").read_text()
    total = sum(p.numel() for p in model.parameters())
    for rank in (0, 1):
        assert f"rank {rank}: FULL_SHARD holds {total // 2} of {total} parameter values" in logs, logs
    one = evaluate(cfg)["small"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["small"]
    assert one["lm/0-shot/a"] == 2 / 6 and one["lm/0-shot/b"] == 2 / 5 and one["gen/0-shot"] == 4 / 11, one
    assert one["lm/0-shot"] == pytest.approx((2 / 6 + 2 / 5) / 2)
    assert set(two) == set(one) and two == pytest.approx(one, rel=1e-5) and two["eval/tokens"] == 8 * (ROW - 1)
