"""Loaders: config validation, ranks, mid-epoch resume, finetuning masks, packing, streaming pitfalls."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from llmfoundry_lite.config import Named, parse
from llmfoundry_lite.data.chat import MPT_SYSTEM_PROMPT
from llmfoundry_lite.data.collators import PackingCollator, auto_packing_ratio
from llmfoundry_lite.data.finetuning import numbered, to_turns
from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.data.mds import clean_stale_shared_memory
from llmfoundry_lite.errors import ConfigError, DataError, UserError
from llmfoundry_lite.prep.finetuning import convert_finetuning
from llmfoundry_lite.registry import dataloaders

IGNORE = -100


def write_rows(folder, n_rows, seq=8):
    """MDS with row i = [i, i, ...]: a row's first id names it."""
    from streaming import MDSWriter
    with MDSWriter(out=str(folder), columns={"tokens": "ndarray:uint16"}) as w:
        for i in range(n_rows):
            w.write({"tokens": np.full(seq, i, dtype=np.uint16)})
    return str(folder)


def dataloader_config_problems(cfg, path="train_loader"):
    try:
        parse(Named[dataloaders], cfg, path)
    except ConfigError as e:
        return e.problems
    return []


def test_config_problems_are_all_listed_with_suggestions(tmp_path):
    cfg = {"name": "text", "num_worker": 2, "dataset": {
        "local": "x", "max_seq_length": 8, "shufle": True,
        "streams": {"a": {"local": "y", "proportoin": 0.5}}}}
    problems = dataloader_config_problems(cfg, "train_loader")
    assert "train_loader.num_worker: unknown key (did you mean 'num_workers'?)" in problems
    assert any(p.startswith("train_loader.dataset.shufle: unknown key (did you mean 'shuffle'?)") for p in problems)
    assert any(p.startswith("train_loader.dataset.max_seq_length: unknown key") for p in problems)
    assert any(p.startswith("train_loader.dataset.streams.a.proportoin: unknown key (did you mean 'proportion'?)")
               for p in problems)
    assert any("max_seq_len: missing required key" in p for p in problems)
    assert dataloader_config_problems({"name": "txt", "dataset": {}}, "eval_loader") == [
        "eval_loader.name: unknown dataloader 'txt' (did you mean 'text'?); choose one of "
        "['finetuning', 'preference', 'text'] or register one with a plug-in"]
    problems = dataloader_config_problems({"name": "finetuning", "prefetch_factor": 2, "dataset": {
        "hf_name": "x.jsonl", "max_seq_len": 8, "target_prompts": "some", "packing_ratio": 0.5}})
    assert len(problems) == 3 and any("num_workers > 0" in p for p in problems)
    with pytest.raises(ConfigError, match="give `local`/`remote`"):
        build_dataloader({"name": "text", "dataset": {"max_seq_len": 8}}, None, 2)


def test_resume_mid_epoch_gives_the_same_next_batches(tok, tmp_path):
    local = write_rows(tmp_path / "rows", 48)
    cfg = {"name": "text", "dataset": {"local": local, "max_seq_len": 8, "shuffle": True, "shuffle_seed": 7}}
    straight = [b["input_ids"][:, 0].tolist() for b in build_dataloader(cfg, tok, 4)]
    assert sorted(sum(straight, [])) == list(range(48)) and sum(straight, [])[:12] != list(range(12))
    loader = build_dataloader(cfg, tok, 4)
    it = iter(loader)
    first = [next(it)["input_ids"][:, 0].tolist() for _ in range(3)]
    state = loader.dataset.state_dict(num_samples=12, from_beginning=False)
    resumed_loader = build_dataloader(cfg, tok, 4)
    resumed_loader.dataset.load_state_dict(state)
    resumed = [b["input_ids"][:, 0].tolist() for b in resumed_loader]
    assert first + resumed == straight


RANK_SCRIPT = textwrap.dedent("""
    import json, sys
    from llmfoundry_lite.data.loaders import build_dataloader
    from llmfoundry_lite.data.tokenizer import build_tokenizer
    tok = build_tokenizer(sys.argv[1])
    cfg = {"name": "text", "dataset": {"local": sys.argv[2], "max_seq_len": 8, "shuffle": True}}
    rows = [r for b in build_dataloader(cfg, tok, 4) for r in b["input_ids"][:, 0].tolist()]
    json.dump(rows, open(sys.argv[3], "w"))
""")


@pytest.mark.multiprocess
def test_two_ranks_read_disjoint_parts_covering_the_split(tiny_tokenizer_dir, tmp_path):
    local = write_rows(tmp_path / "rows", 40)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script), tiny_tokenizer_dir, local,
                                       str(tmp_path / f"rank{rank}.json")], env=env))
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    r0, r1 = (json.load(open(tmp_path / f"rank{r}.json")) for r in range(2))
    assert len(r0) == len(r1) == 20
    assert not set(r0) & set(r1) and sorted(r0 + r1) == list(range(40))


def test_prompt_response_labels_and_overlong_counting(tok, tmp_path):
    data = tmp_path / "pr.jsonl"
    examples = [{"prompt": "Return the path.", "response": " It is."},
                {"prompt": "x" * 200, "response": " y"},  # prompt alone fills max_seq_len: no target left
                {"prompt": "Split", "response": " the string into a list of words" * 4},  # truncated
                {"prompt": "", "response": " empty prompt"}]
    data.write_text("".join(json.dumps(e) + "\n" for e in examples))
    cfg = {"name": "finetuning", "dataset": {"hf_name": str(data), "max_seq_len": 24}}
    loader = build_dataloader(cfg, tok, 4)
    assert loader.dataset.stats == {"examples": 4, "truncated": 1, "dropped empty": 1, "dropped without targets": 1}
    batch = next(iter(loader))
    p = tok("Return the path.", add_special_tokens=False)["input_ids"]
    r = tok(" It is.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(p) + len(r)
    assert batch["input_ids"].shape == (2, 24)
    assert batch["input_ids"][0, :n].tolist() == p + r
    assert batch["labels"][0].tolist() == [IGNORE] * len(p) + r + [IGNORE] * (24 - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (24 - n)
    assert batch["attention_mask"][1].all() and (batch["labels"][1] != IGNORE).sum() > 0
    # 2 usable examples: a batch of 4 with drop_last would give epochs without batches (a run that never ends)
    with pytest.raises(DataError, match=r"yields no batches: this process gets 2 examples, fewer than one batch of 4 "
                                        r"with drop_last: true"):
        build_dataloader({**cfg, "drop_last": True}, tok, 4)
    # target_prompts all + pad to the longest of the batch
    cfg["dataset"].update(target_prompts="all", allow_pad_trimming=True)
    batch = next(iter(build_dataloader(cfg, tok, 1)))
    assert batch["labels"][0].tolist() == p + r and batch["input_ids"].shape == (1, n)


def test_multi_turn_chat_masks_every_turn_by_hand(tok, tmp_path):
    messages = [{"role": "user", "content": "hi there, friend"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "sure"}]
    pieces = [("<|im_start|>user\nhi there, friend<|im_end|>\n<|im_start|>assistant\n", "yo<|im_end|>\n"),
              ("<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\n", "sure<|im_end|>\n")]
    assert to_turns({"messages": messages}, tok) == pieces
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    p1, r1, p2, r2 = enc(pieces[0][0]), enc(pieces[0][1]), enc(pieces[1][0]), enc(pieces[1][1]) + [tok.eos_token_id]
    assert len(p1) > len(p2)
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": messages}) + "\n")
    for responses, prompts, want in [
            ("last", "none", [IGNORE] * (len(p1) + len(r1) + len(p2)) + r2),
            ("all", "none", [IGNORE] * len(p1) + r1 + [IGNORE] * len(p2) + r2),
            ("all", f"length>={len(p1)}", p1 + r1 + [IGNORE] * len(p2) + r2)]:  # only the longer prompt counts
        cfg = {"name": "finetuning", "dataset": {"hf_name": str(data), "max_seq_len": 64,
                                                 "target_responses": responses, "target_prompts": prompts}}
        ex = build_dataloader(cfg, tok, 1).dataset[0]
        assert ex["input_ids"] == p1 + r1 + p2 + r2 and ex["labels"] == want
    # the MPT-7B-Chat format opens with its system prompt
    turns = to_turns({"messages": messages}, tok, chat_template="mpt-7b-chat")
    assert turns[0][0] == f"<|im_start|>system\n{MPT_SYSTEM_PROMPT}<|im_end|>\n" + pieces[0][0]
    with pytest.raises(DataError, match="end with an assistant"):
        to_turns({"messages": messages[:1]}, tok)


def test_preprocessors_and_finetuning_mds(tok, tmp_path):
    dolly = tmp_path / "dolly.jsonl"
    dolly.write_text(json.dumps({"instruction": "Name it.", "context": "", "response": "Path", "category": "qa"}) + "\n")
    base = {"hf_name": str(dolly), "max_seq_len": 48}
    ex = build_dataloader({"name": "finetuning", "dataset": {**base, "preprocessing_fn": "dolly"}}, tok, 1).dataset[0]
    assert tok.decode(ex["input_ids"]) == "### Instruction:\nName it.\n### Response:\nPath<|endoftext|>"
    with pytest.raises(DataError, match="missing field 'output'"):
        build_dataloader({"name": "finetuning", "dataset": {**base, "preprocessing_fn": "alpaca"}}, tok, 1)
    with pytest.raises(DataError, match="expected prompt/response or messages"):
        build_dataloader({"name": "finetuning", "dataset": base}, tok, 1)
    ex2 = build_dataloader({"name": "finetuning", "dataset": {
        **base, "preprocessing_fn": "llmfoundry_lite.data.finetuning:dolly"}}, tok, 1).dataset[0]
    assert ex2 == ex
    with pytest.raises(UserError, match="unknown finetuning preprocessor 'doly' \\(did you mean 'dolly'\\?\\)"):
        build_dataloader({"name": "finetuning", "dataset": {**base, "preprocessing_fn": "doly"}}, tok, 1)
    # pre-tokenized MDS gives the same example as the raw file
    raw = [{"instruction": "Name it.", "context": "", "response": "Path"}]
    stats = convert_finetuning(numbered(raw), str(tmp_path / "ft"), tok, 48, preprocessing_fn="dolly")
    assert stats["written"] == 1
    mds = build_dataloader({"name": "finetuning", "dataset": {"local": str(tmp_path / "ft"), "max_seq_len": 48}}, tok, 1)
    assert mds.dataset[0] == ex


def test_packing_sequence_id_and_labels():
    examples = [{"input_ids": [i] * n, "labels": [IGNORE] * (n - 1) + [i]} for i, n in enumerate([5, 3, 4, 2, 7], 1)]
    collate = PackingCollator(pad_token_id=0, max_seq_len=8, rows=2)
    batch = collate(examples)
    # first-fit decreasing by length: bins {7}, {5, 3}, {4, 2}; the 2 fullest ({5, 3}: 8, {7}: 7) are kept
    assert batch["input_ids"].tolist() == [[1] * 5 + [2] * 3, [5] * 7 + [0]]
    assert batch["sequence_id"].tolist() == [[0] * 5 + [1] * 3, [0] * 7 + [-1]]
    assert batch["labels"].tolist() == [[IGNORE] * 4 + [1] + [IGNORE] * 2 + [2], [IGNORE] * 6 + [5, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 7 + [0]]
    assert [e["input_ids"][0] for e in collate.leftover] == [3, 4]  # not dropped: they go first next time
    assert collate.stats["dropped leftover examples"] == 0
    nxt = collate([])
    assert nxt["input_ids"].tolist()[0] == [3] * 4 + [4] * 2 + [0] * 2
    assert auto_packing_ratio([2] * 100, 8, rows=4) >= 3.0 and auto_packing_ratio([8] * 100, 8, rows=4) == 1.0


def test_packing_from_config(tok, tmp_path):
    data = tmp_path / "pr.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": " a"}) + "\n" for i in range(16)))
    loader = build_dataloader({"name": "finetuning", "dataset": {
        "hf_name": str(data), "max_seq_len": 32, "packing_ratio": "auto"}}, tok, 2)
    assert loader.batch_size > 2
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (2, 32) and batch["sequence_id"].max() >= 1


def test_reused_local_folder_is_a_clear_error(tok, tmp_path):
    remote = write_rows(tmp_path / "remote", 8)
    cfg = {"name": "text", "dataset": {"remote": remote, "local": str(tmp_path / "cache"), "max_seq_len": 8}}
    first = build_dataloader(cfg, tok, 2)
    with pytest.raises(UserError, match="in use by another dataset"):
        build_dataloader(cfg, tok, 2)
    assert len(first.dataset) == 8


def test_only_stale_shared_memory_is_cleaned():
    from multiprocessing.shared_memory import SharedMemory
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    live = SharedMemory("987650_locals", create=True, size=16)
    stale = SharedMemory("987651_locals", create=True, size=16)
    stale.close()  # unmapped, like one a killed run left behind
    try:
        assert clean_stale_shared_memory() >= 1
        assert not os.path.exists("/dev/shm/987651_locals") and os.path.exists("/dev/shm/987650_locals")
    finally:
        live.close()
        live.unlink()
        if os.path.exists("/dev/shm/987651_locals"):
            os.unlink("/dev/shm/987651_locals")
