"""Every benchmark figure YAML is a valid training config (with the benchmark's synthetic data and
tokenizer plug-ins), for the world size it names; the runner's synthetic rows are deterministic; one seed of
benchmarks/dpo_vs_sft.py (DPO learns its synthetic rule, SFT on the chosen replies does not)."""
import glob
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "figures", "*.yaml")))


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("bench_throughput", os.path.join(ROOT, "benchmarks", "bench_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # registers the `synthetic` loader and tokenizer, `benchmark_timer`
    yield module
    from llmfoundry_lite import registry  # leave the registries as the other tests expect them
    for reg, name in ((registry.dataloaders, "synthetic"), (registry.tokenizers, "synthetic"),
                      (registry.callbacks, "benchmark_timer")):
        reg.remove(name)
    del sys.modules[spec.name]


# name -> (precision, d_model, max_seq_len) the figure must train with: what results/throughput.md reports
SHAPES = {"cpu-mpt-tiny": ("fp32", 128, 128), "cpu-d256-seq256": ("fp32", 256, 256),
          "cpu-d256-seq1024": ("fp32", 256, 1024), "gpu-mpt-125m": ("amp_bf16", 768, 2048),
          "gpu-mpt-350m": ("amp_bf16", 1024, 2048), "gpu-mpt-1b": ("amp_bf16", 2048, 2048),
          "gpu-mpt-7b-lora": ("amp_bf16", 4096, 2048)}


@pytest.mark.parametrize("name", SHAPES)
def test_figure_trains_what_its_name_says(runner, name):
    from llmfoundry_lite.config import load_config
    cfg = load_config(os.path.join(ROOT, "benchmarks", "figures", f"{name}.yaml"))
    assert (cfg["precision"], cfg["model"]["d_model"], cfg["max_seq_len"]) == SHAPES[name]


@pytest.mark.parametrize("path", FIGURES, ids=os.path.basename)
def test_figure_validates(runner, path):
    from llmfoundry_lite.config import load_config
    from llmfoundry_lite.training.schema import check_train_config
    world = 8 if path.endswith("-8x.yaml") else 1
    check_train_config(load_config(path, ["callbacks.benchmark_timer.warmup=2"]), world_size=world)


def test_synthetic_rows_are_deterministic_and_in_vocab(runner):
    rows = runner.RandomRows(runner.SyntheticConfig(max_seq_len=16, vocab_size=50))
    assert (rows[3] == rows[3]).all() and not (rows[3] == rows[4]).all()
    assert rows[3].shape == (16,) and int(rows[3].max()) < 50


def test_dpo_vs_sft_benchmark_one_seed(torch_one_thread):
    """benchmarks/dpo_vs_sft.py's own code path, one seed of the five that results/dpo.md reports: DPO
    learns the rule the rejected replies break; SFT on the chosen replies, same budget, stays near chance."""
    spec = importlib.util.spec_from_file_location("dpo_vs_sft", os.path.join(ROOT, "benchmarks", "dpo_vs_sft.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    train_pairs, held_out = bench.task(0)
    assert not {json.dumps(p) for p in held_out} & {json.dumps(p) for p in train_pairs}
    result = bench.compare([0])
    start, dpo, sft = (result[k]["accuracy"]["mean"] for k in ("start", "dpo", "sft"))
    assert 0.35 <= start <= 0.65 and dpo >= 0.9 and sft <= dpo - 0.2, (start, dpo, sft)
    assert result["dpo"]["reward_margin"]["mean"] > 0
