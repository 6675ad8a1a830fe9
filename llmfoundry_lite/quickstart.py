"""`llmfoundry-lite quickstart` (and `make quickstart`): the whole job, offline, on CPU, in minutes.

1. corpus      standard-library docstrings -> train/val JSONL     (`python -m llmfoundry_lite.quickstart_corpus`)
2. tokenizer   a byte-level BPE trained on the train split       (`llmfoundry-lite data-prep train-tokenizer`)
3. mds         both splits tokenized and packed into MDS shards  (`llmfoundry-lite data-prep json`)
4. pretrain    mpt-tiny-cpu with 2 processes and FSDP2           (`composer -n 2 scripts/train.py ...`);
               validation loss before (eval_first) and during/after training, checkpoints as it goes
5. export      the last checkpoint -> a Hugging Face folder      (`llmfoundry-lite convert`),
               then loaded back with stock `transformers.AutoModelForCausalLM` (no custom code)
6. generate    completions of docstring-style prompts            (`llmfoundry-lite generate`)
7. plot        train/val loss curves -> PNG, and a summary of paths, numbers and next commands

Every step but the last is an ordinary command, printed before it runs and in the summary, so it can
be repeated by hand. A finished step is recorded in `<out_dir>/.steps/<name>.json` with its command and
reused by a re-run with the same command; once a step runs again, so do all later ones, so the outputs
never mix two runs. An interrupted training run continues from its last checkpoint (autoresume).

The out_dir's `.llmfoundry_lite.json` lists what the quickstart writes there (`outputs`); a re-run
replaces only those. A folder without it (a user's, or one of an older version) is refused before any
work unless `--overwrite`, which replaces those entries and keeps every other file.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.hf_import import load_hf_model
from llmfoundry_lite.files import atomic_write, claim_folder, remove_entries

REPO = Path(__file__).resolve().parent.parent
PRETRAIN_YAML = "yamls/pretrain/mpt-tiny-cpu.yaml"
EVAL_YAML = "yamls/eval/mpt-tiny.yaml"
RUN_NAME = "mpt-tiny-cpu"          # the YAML's run_name: checkpoints go to <out>/checkpoints/<run_name>
SEQ_LEN = 128                      # the YAML's max_seq_len: MDS rows are exactly this long
PROMPTS = ["Return the number of", "This module provides", "Raise ValueError if"]
WRITER = "quickstart"              # named in the out_dir's manifest (files.py)


@dataclass
class Size:
    """How big the run is: `full` fits in a few minutes on 2 cores, `tiny` is for tests (~1 minute)."""
    max_docs: int          # 0 = the whole corpus
    vocab_size: int
    max_duration: str
    eval_interval: str     # max_duration must be a multiple, so the last evaluation is the final model
    save_interval: str


SIZES = {
    "full": Size(max_docs=0, vocab_size=4096, max_duration="300ba", eval_interval="50ba", save_interval="100ba"),
    "tiny": Size(max_docs=300, vocab_size=512, max_duration="6ba", eval_interval="3ba", save_interval="3ba"),
}


@dataclass
class Step:
    name: str
    title: str
    argv: List[str]
    outputs: List[str]                  # paths the step writes (removed before a fresh run; in the manifest)
    env: Dict[str, str] = field(default_factory=dict)
    resumable: bool = False             # an interrupted run is continued, not restarted


def layout(out: str) -> SimpleNamespace:
    """Where each step writes: the same names as the defaults of yamls/pretrain/mpt-tiny-cpu.yaml and
    yamls/eval/mpt-tiny.yaml, so those YAMLs work on the quickstart's output as they are."""
    def j(*parts):
        return os.path.join(out, *parts)
    return SimpleNamespace(out=out, corpus=j("corpus"), tokenizer=j("tokenizer"), data=j("data"), logs=j("logs"),
                           metrics=j("logs", "metrics.jsonl"), checkpoints=j("checkpoints", RUN_NAME),
                           last_checkpoint=j("checkpoints", RUN_NAME, "latest-rank0.pt"), hf=j("hf"),
                           eval=j("eval"), plot=j("loss.png"), summary=j("summary.txt"))


def add_arguments(parser) -> None:
    parser.add_argument("--out_dir", default="quickstart_out", help="where everything goes (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="a minimal run (small corpus, a few batches) for tests")
    parser.add_argument("--max_duration", default=None, help="override the training length, e.g. 500ba")
    parser.add_argument("--num_procs", type=int, default=2,
                        help="training processes for the composer launcher (default: %(default)s)")
    parser.add_argument("--fresh", action="store_true", help="redo every step instead of reusing finished ones")
    parser.add_argument("--overwrite", action="store_true",
                        help="use an --out_dir the quickstart did not write: its corpus/, tokenizer/, data/train/, "
                             "data/val/, checkpoints/mpt-tiny-cpu/, logs/, eval/, hf/, .steps/, loss.png and "
                             "summary.txt are replaced, every other file is kept")


def plan(paths: SimpleNamespace, size: Size, max_duration: str, num_procs: int) -> List[Step]:
    """The steps as commands, with paths as given (relative to the current directory by default)."""
    llmf = ["llmfoundry-lite"]
    corpus_argv = ["python", "-m", "llmfoundry_lite.quickstart_corpus", "--out_dir", paths.corpus]
    if size.max_docs:
        corpus_argv += ["--max_docs", str(size.max_docs)]
    steps = [
        Step("corpus", "build the corpus (standard-library docstrings)", corpus_argv, [paths.corpus]),
        Step("tokenizer", "train a byte-level BPE tokenizer on the train split",
             llmf + ["data-prep", "train-tokenizer", os.path.join(paths.corpus, "train.txt"), "--out", paths.tokenizer,
                     "--vocab_size", str(size.vocab_size)], [paths.tokenizer]),
    ]
    for split in ("train", "val"):
        steps.append(Step(f"data_{split}", f"tokenize the {split} split into MDS shards",
                          llmf + ["data-prep", "json", "--path", os.path.join(paths.corpus, f"{split}.jsonl"),
                                  "--out_root", paths.data, "--split", split, "--concat_tokens", str(SEQ_LEN),
                                  "--tokenizer", paths.tokenizer, "--eos_text", "<|endoftext|>"],
                          [os.path.join(paths.data, split)]))
    train_argv = ["composer", "-n", str(num_procs), _repo_file("scripts/train.py"), _repo_file(PRETRAIN_YAML),
                  f"variables.data_local={paths.data}", f"variables.tokenizer_name={paths.tokenizer}",
                  f"save_folder={paths.checkpoints}", f"max_duration={max_duration}",
                  f"eval_interval={size.eval_interval}", f"save_interval={size.save_interval}", "eval_first=true",
                  "eval_subset_num_batches=-1", "progress_bar=true", f"loggers.jsonl.path={paths.metrics}"]
    steps += [
        Step("pretrain", f"pretrain mpt-tiny-cpu with {num_procs} processes (FSDP2 over gloo)", train_argv,
             [paths.checkpoints, paths.metrics], env={"OMP_NUM_THREADS": "1"}, resumable=True),
        # Validation perplexity of the final checkpoint and of its untrained self. The YAML's ICL task
        # suite is left out here (a tiny model scores near chance; the summary shows the command with it).
        Step("eval", "evaluate validation perplexity: the trained model against its untrained self",
             llmf + ["eval", _repo_file(EVAL_YAML), f"variables.out={paths.out}", f"results_path={paths.eval}",
                     "icl_tasks=null", "progress_bar=false"], [paths.eval]),
        Step("export", "export the last checkpoint to a Hugging Face folder",
             llmf + ["convert", "--composer_path", paths.last_checkpoint, "--hf_output_path", paths.hf], [paths.hf]),
        Step("generate", "complete a few docstring-style prompts",
             llmf + ["generate", paths.hf, "--prompts", *PROMPTS, "--max_new_tokens", "24"], []),
    ]
    return steps


def _repo_file(rel: str) -> str:
    """`rel` as typed from the repository root, or an absolute path when run from elsewhere."""
    return rel if os.path.abspath(rel) == str(REPO / rel) else str(REPO / rel)


def outputs(paths: SimpleNamespace, steps: List[Step]) -> List[str]:
    """Every entry the quickstart writes in its out_dir, relative to it: what its manifest lists."""
    written = [p for step in steps for p in step.outputs] + [paths.logs, paths.plot, paths.summary]
    return sorted({os.path.relpath(p, paths.out) for p in written} | {".steps"})


def run(args) -> int:
    size = SIZES["tiny" if args.tiny else "full"]
    paths = layout(args.out_dir)
    steps = plan(paths, size, args.max_duration or size.max_duration, args.num_procs)
    # before any work: the out_dir is new, empty or the quickstart's own (else --overwrite)
    names = outputs(paths, steps)
    ours = claim_folder(paths.out, WRITER, "--out_dir", args.overwrite, names,
                        overwrite_does=f"the quickstart replaces its own entries there ({', '.join(names)})")
    if args.overwrite:  # entries of our names that the quickstart did not write: replaced, never reused
        remove_entries(paths.out, set(names) - ours)
    state_dir = os.path.join(paths.out, ".steps")
    os.makedirs(state_dir, exist_ok=True)
    started = time.time()
    redo = args.fresh
    seconds: Dict[str, float] = {}
    total = len(steps) + 1
    for i, step in enumerate(steps, 1):
        record = _read_record(state_dir, step.name)
        same = record is not None and record["argv"] == step.argv
        print(f"\n[{i}/{total}] {step.title}\n$ {_show(step)}", flush=True)
        if same and record["done"] and not redo:
            print("(done before: reused; pass --fresh to redo everything)", flush=True)
            seconds[step.name] = record.get("seconds", 0.0)
            continue
        # continue an interrupted run of this very command, unless --fresh or an earlier step was redone
        resume = same and step.resumable and not redo
        redo = True  # every later step follows this one, so outputs never mix two runs
        if not resume:  # a fresh run: remove what an earlier one wrote (listed in the manifest)
            remove_entries(paths.out, [os.path.relpath(p, paths.out) for p in step.outputs])
        _write_record(state_dir, step.name, {"argv": step.argv, "done": False})
        t0 = time.time()
        log_path = os.path.join(paths.logs, f"{step.name}.log")
        rc = _run_logged(step, log_path)
        if rc != 0:
            raise UserError(f"step '{step.name}' failed (exit code {rc}); its output is in {log_path}.\n"
                            "Fix the problem and run the quickstart again: finished steps are reused.")
        seconds[step.name] = time.time() - t0
        _write_record(state_dir, step.name, {"argv": step.argv, "done": True, "seconds": seconds[step.name]})
    print(f"\n[{total}/{total}] load the HF folder with stock transformers, plot the loss curves", flush=True)
    print(_finish(paths, steps, seconds, time.time() - started), flush=True)
    return 0


# --- running commands --------------------------------------------------------------------------

def _show(step: Step) -> str:
    return "".join(f"{k}={v} " for k, v in step.env.items()) + shlex.join(step.argv)


def _run_logged(step: Step, log_path: str) -> int:
    """Run the step's command in the caller's environment, offline, with this Python's scripts first on
    PATH; echo its output and keep a copy."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", **os.environ,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **step.env}
    proc = subprocess.Popen(step.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
    with open(log_path, "wb") as log:
        for chunk in iter(lambda: proc.stdout.read(4096), b""):  # raw reads: output shows as it comes
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
    return proc.wait()


def _read_record(state_dir: str, name: str) -> Optional[dict]:
    try:
        return json.loads(Path(state_dir, f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def _write_record(state_dir: str, name: str, record: dict) -> None:
    with atomic_write(os.path.join(state_dir, f"{name}.json")) as f:
        json.dump(record, f, indent=1)


# --- the last step: check, plot, summarise -------------------------------------------------------

TRAIN_LOSS = "loss/train/total"
EVAL_LOSS = "metrics/eval/LanguageCrossEntropy"


def read_metrics(path: str) -> Dict[str, List[tuple]]:
    """{metric: [(batch, value), ...]} from the JSONL logger's file; a resumed run re-logs some batches,
    and the last value logged for a batch wins."""
    series: Dict[str, Dict[int, float]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, {})[row["step"]] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_losses(metrics: Dict[str, List[tuple]], out_png: str) -> None:
    import matplotlib  # lazy: only the plot step needs it (slow to import)
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, style in ((TRAIN_LOSS, "train loss", "-"), (EVAL_LOSS, "validation loss", "o-")):
        if metrics.get(key):
            xs, ys = zip(*metrics[key], strict=True)
            ax.plot(xs, ys, style, label=label)
    ax.set(xlabel="batch", ylabel="cross-entropy (nats/token)",
           title="llmfoundry-lite quickstart: mpt-tiny-cpu on stdlib docstrings")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def check_hf_folder(hf_dir: str) -> Dict[str, object]:
    """Load the export with stock transformers (no custom code) and compare its logits with ours."""
    stock = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours = load_hf_model(hf_dir).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (stock(ids).logits - ours(ids).logits).abs().max().item()
    return {"class": type(stock).__name__, "params": sum(p.numel() for p in stock.parameters()),
            "max_logit_diff": diff}


def _generations(log_path: str) -> List[str]:
    """The completions the generate command printed between its #### separators."""
    try:
        parts = Path(log_path).read_text(encoding="utf-8", errors="replace").split("#" * 60)
    except OSError:
        return []
    return [p.strip() for p in parts[1:-1] if p.strip()]


def _eval_rows(eval_dir: str) -> List[Dict[str, str]]:
    try:
        with open(os.path.join(eval_dir, "results.csv"), newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def _finish(paths: SimpleNamespace, steps: List[Step], seconds: Dict[str, float], wall: float) -> str:
    metrics = read_metrics(paths.metrics)
    plot_losses(metrics, paths.plot)
    hf = check_hf_folder(paths.hf)
    lines = ["", "=" * 78, "quickstart summary", "=" * 78, "Where things are:"]
    for label, path in (("corpus (JSONL)", paths.corpus), ("tokenizer", paths.tokenizer), ("MDS shards", paths.data),
                        ("checkpoints", paths.checkpoints), ("HF folder", paths.hf), ("eval results", paths.eval),
                        ("loss plot", paths.plot), ("metrics log", paths.metrics), ("step logs", paths.logs)):
        lines.append(f"  {label:15s} {path}")
    lines.append("Numbers:")
    if evals := metrics.get(EVAL_LOSS):
        (b0, l0), (b1, l1) = evals[0], evals[-1]
        lines.append(f"  validation loss {l0:.3f} (perplexity {math.exp(l0):.1f}) at batch {b0} -> "
                     f"{l1:.3f} (perplexity {math.exp(l1):.1f}) at batch {b1}")
    if metrics.get(TRAIN_LOSS):
        lines.append(f"  train loss {metrics[TRAIN_LOSS][0][1]:.3f} -> {metrics[TRAIN_LOSS][-1][1]:.3f}")
    for key, fmt in (("throughput/tokens_per_sec", "  training speed {:,.0f} tokens/s"),
                     ("throughput/device/mfu", "  MFU {:.2%} of the declared CPU peak")):
        if metrics.get(key):
            lines.append(fmt.format(metrics[key][-1][1]))
    for row in _eval_rows(paths.eval):
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in row.items() if k != "model_name")
        lines.append(f"  eval {row.get('model_name', '?')}: {shown}")
    lines.append(f"  HF export loads with stock transformers as {hf['class']} ({hf['params']:,} parameters); "
                 f"max |logit difference| to llmfoundry_lite: {hf['max_logit_diff']:.1e}")
    lines += [f"  generated: {text!r}" for text in _generations(os.path.join(paths.logs, "generate.log"))]
    lines.append("  step times: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items())
                 + f"; this run {wall:.0f}s (reused steps take no time)")
    lines.append("Each step as a command (run from the repository root to repeat it):")
    lines += [f"  {_show(step)}" for step in steps]
    lines += ["Next:",
              f"  llmfoundry-lite chat {paths.hf}",
              f"  llmfoundry-lite serve {paths.hf} --port 8080",
              f"  llmfoundry-lite convert --hf_path {paths.hf} --gguf_output_path {paths.out}/mpt-tiny.gguf"
              "   # for llama.cpp / Ollama",
              f"  llmfoundry-lite eval {EVAL_YAML} variables.out={paths.out}   # with the ICL task suite",
              f"  llmfoundry-lite train {PRETRAIN_YAML} variables.data_local={paths.data} "
              f"variables.tokenizer_name={paths.tokenizer} save_folder={paths.out}/checkpoints/longer "
              "max_duration=1000ba",
              "  jupyter lab notebooks/finetune_mpt.ipynb   # finetuning from Python",
              "  README.md: data prep, finetuning, FSDP on GPUs, serving, the YAML reference"]
    text = "\n".join(lines)
    Path(paths.summary).write_text(text + "\n", encoding="utf-8")
    return text


def _fmt(value: str) -> str:
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value
