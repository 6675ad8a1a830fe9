"""Preference finetuning (DPO), one process: the loss against hand-computed DPO / IPO / conservative DPO,
log 2 when the policy is the reference, loss masks on the replies only (string and chat pairs), the
hh_rlhf preprocessor, bad rows and counted drops, LoRA's reference (adapters disabled), a short run of
yamls/finetune/mpt-tiny-cpu-dpo.yaml whose held-out preference accuracy rises, and config errors."""
import json
import math
import os
import random

import pytest
import torch

from llmfoundry_lite.assembly.lora import apply_lora
from llmfoundry_lite.data.collators import PreferenceCollator
from llmfoundry_lite.data.finetuning import hh_rlhf
from llmfoundry_lite.data.preference import PreferenceDataset, sequence_logps
from llmfoundry_lite.errors import ConfigError, DataError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.prep.preference import score_pairs
from llmfoundry_lite.training.objectives.dpo import ComposerMPTDPO, dpo_loss
from llmfoundry_lite.training.schema import check_train_config

from train_utils import ROOT

pytestmark = pytest.mark.usefixtures("torch_one_thread")
YAML = os.path.join(ROOT, "yamls", "finetune", "mpt-tiny-cpu-dpo.yaml")
TINY = dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=448)


def hand_logps(logits, labels):
    """Independent of the code under test: a loop over rows and positions."""
    out = []
    for row_logits, row_labels in zip(logits.tolist(), labels.tolist(), strict=True):
        total = 0.0
        for t in range(len(row_labels) - 1):
            target = row_labels[t + 1]
            if target != -100:
                lse = math.log(sum(math.exp(v) for v in row_logits[t]))
                total += row_logits[t][target] - lse
        out.append(total)
    return out


@pytest.mark.parametrize("variant,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_loss_equals_a_hand_computed_dpo_loss(variant, eps):
    torch.manual_seed(0)
    B, L, V, beta = 3, 6, 7, 0.5
    labels = torch.randint(0, V, (2 * B, L))
    labels[:, :2] = -100  # the prompt
    labels[1, 4:] = -100  # padding
    policy_logits, ref_logits = torch.randn(2 * B, L, V), torch.randn(2 * B, L, V)
    pol, ref = sequence_logps(policy_logits, labels), sequence_logps(ref_logits, labels)
    assert pol.tolist() == pytest.approx(hand_logps(policy_logits, labels), abs=1e-5)
    out = dpo_loss(pol[:B], pol[B:], ref[:B], ref[B:], beta, eps, variant)
    hp, hr = hand_logps(policy_logits, labels), hand_logps(ref_logits, labels)
    losses, acc = [], []
    for i in range(B):
        h = (hp[i] - hp[B + i]) - (hr[i] - hr[B + i])
        if variant == "ipo":
            losses.append((h - 1 / (2 * beta)) ** 2)
        else:
            sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731 (a one-line helper of the formula)
            losses.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
        acc.append(float(beta * (hp[i] - hr[i]) > beta * (hp[B + i] - hr[B + i])))
    assert out["loss"].item() == pytest.approx(sum(losses) / B, rel=1e-5)
    assert out["rewards_chosen"].tolist() == pytest.approx([beta * (hp[i] - hr[i]) for i in range(B)], abs=1e-5)
    assert out["rewards_rejected"].tolist() == pytest.approx([beta * (hp[B + i] - hr[B + i]) for i in range(B)],
                                                              abs=1e-5)
    assert out["reward_accuracy"].tolist() == acc


def string_pairs(n, seed=0):
    rng = random.Random(seed)
    words = ["red", "blue", "green", "black", "white", "brown", "pink", "gold"]
    pairs = []
    for _ in range(n):
        w, v = rng.sample(words, 2)
        pairs.append({"prompt": f"Repeat {w}", "chosen": f" {w}", "rejected": f" {v}"})
    return pairs


def test_policy_equal_to_reference_gives_log_2_and_zero_rewards(tok):
    torch.manual_seed(0)
    model = ComposerMPTDPO(MPTForCausalLM(MPTConfig(**TINY)), tok)
    batch = PreferenceCollator(tok.pad_token_id, 32, pad_to_longest=True)(PreferenceDataset(string_pairs(4), tok, 32))
    out = model(batch)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards_chosen"].abs().max() < 1e-6 and out["rewards_rejected"].abs().max() < 1e-6
    out["loss"].backward()  # the policy gets gradients, the frozen reference none
    assert any(p.grad is not None for p in model.model.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model._frozen[0].parameters())
    assert not any(n.startswith("_frozen") for n, _ in model.named_parameters())


def test_loss_masks_cover_the_replies_only(tok):
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tok.eos_token_id
    pairs = PreferenceDataset([{"prompt": "Say it:", "chosen": " yes", "rejected": " no thanks"}], tok, 32)
    batch = PreferenceCollator(tok.pad_token_id, 16)(pairs)
    assert batch["input_ids"].shape == (1, 2, 16)  # [pairs, (chosen, rejected), max_seq_len]
    p = enc("Say it:")
    for side, reply in ((0, " yes"), (1, " no thanks")):
        r = enc(reply) + [eos]
        n = len(p) + len(r)
        assert batch["input_ids"][0, side, :n].tolist() == p + r
        assert batch["labels"][0, side].tolist() == [-100] * len(p) + r + [-100] * (16 - n)
        assert batch["attention_mask"][0, side].tolist() == [1] * n + [0] * (16 - n)
    # chat form: the shared turns and the assistant header are prompt; the last reply (ChatML end) is the target
    shared = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "yes or no?"}]
    chat = {"chosen": shared + [{"role": "assistant", "content": "yes"}],
            "rejected": shared + [{"role": "assistant", "content": "no"}]}
    batch = PreferenceCollator(tok.pad_token_id, 64, pad_to_longest=True)(PreferenceDataset([chat], tok, 64))
    for side, reply in ((0, "yes"), (1, "no")):
        ids, labels = batch["input_ids"][0, side].tolist(), batch["labels"][0, side].tolist()
        target = [t for t in labels if t != -100]
        assert tok.decode(target) == f"{reply}<|im_end|>\n{tok.eos_token}"
        first = labels.index(target[0])
        assert tok.decode(ids[:first]) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                                           "<|im_start|>user\nyes or no?<|im_end|>\n<|im_start|>assistant\n")


def test_hh_rlhf_preprocessor(tok):
    row = {"chosen": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: It is 6.",
           "rejected": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: No idea."}
    assert hh_rlhf(row) == {"prompt": "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant:",
                            "chosen": " It is 6.", "rejected": " No idea."}
    assert len(PreferenceDataset([row], tok, 64, preprocessing_fn="hh_rlhf")) == 1
    bad = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"}
    with pytest.raises(DataError, match=r"example 1: hh_rlhf: rejected does not share"):
        PreferenceDataset([row, bad], tok, 64, preprocessing_fn="hh_rlhf")


def test_bad_rows_are_data_errors_and_drops_are_counted(tok):
    good = {"prompt": "Say", "chosen": " a", "rejected": " b"}
    cases = [({"prompt": "Say", "chosen": " a"}, "example 1: pair has keys ['chosen', 'prompt']; expected prompt"),
             ({"prompt": ["x"], "chosen": " a", "rejected": " b"}, "example 1: chosen and rejected are strings, so "
                                                                    "prompt must be one too"),
             ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
               "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
              "example 1: chosen and rejected must share every message but the last"),
             ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "r"}]},
              "example 1: chosen: the chat ends with a user message")]
    for row, message in cases:
        with pytest.raises(DataError) as e:
            PreferenceDataset([good, row], tok, 32)
        assert str(e.value).startswith(message), str(e.value)
    long_prompt = " ".join(["word"] * 40)
    rows = [good, {"prompt": "Say", "chosen": " a", "rejected": " a"}, {"prompt": "", "chosen": " a", "rejected": " b"},
            {"prompt": long_prompt, "chosen": " a", "rejected": " b"},
            {"prompt": "Say", "chosen": " word" * 40, "rejected": " b"}]
    data = PreferenceDataset(rows, tok, 16)
    assert dict(data.stats) == {"pairs": 5, "prompt truncated": 1, "dropped too long": 1,
                                "dropped chosen equals rejected": 1, "dropped empty": 1}
    truncated = data[1]
    assert len(truncated["prompt"]) + max(len(truncated["chosen"]), len(truncated["rejected"])) == 16
    full = tok(long_prompt, add_special_tokens=False)["input_ids"]
    assert truncated["prompt"] == full[-len(truncated["prompt"]):]  # cut from the left


def test_lora_reference_is_the_base_model_with_adapters_disabled(tok):
    torch.manual_seed(0)
    base = MPTForCausalLM(MPTConfig(**TINY)).eval()
    batch = PreferenceCollator(tok.pad_token_id, 32, pad_to_longest=True)(PreferenceDataset(string_pairs(4), tok, 32))
    ids = batch["input_ids"].flatten(0, 1)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    model = ComposerMPTDPO(apply_lora(base, {"r": 4, "lora_alpha": 8}), tok)
    assert model._frozen == []  # no second copy
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that changed the model
        model.model.train()
        with model.reference() as ref:
            assert not ref.training
            assert torch.equal(ref(input_ids=ids).logits, base_logits)
        assert model.model.training  # restored
        assert not torch.allclose(model.model(input_ids=ids).logits, base_logits)
        out = model(batch)
    assert out["rewards_chosen"].abs().max() > 0 and out["loss"].item() != pytest.approx(math.log(2))


def preference_accuracy(model, tok, pairs):
    """How often the model gives the chosen reply a higher log-probability than the rejected one."""
    logps = score_pairs(model, PreferenceDataset(pairs, tok, 32), tok.pad_token_id)
    return (logps[:, 0] > logps[:, 1]).float().mean().item()


def dpo_inputs(tok, tmp_path, train_rows, test_rows=()):
    """A tiny MPT folder (attn_uses_sequence_id false, as saved by default) and a folder of train.jsonl
    (and test.jsonl) pairs."""
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig(**TINY)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    (tmp_path / "data").mkdir()
    for split, rows in (("train", train_rows), ("test", test_rows)):
        if rows:
            (tmp_path / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "hf", tmp_path / "data"


def test_tiny_cpu_dpo_yaml_raises_held_out_preference_accuracy(tok, tmp_path):
    """A synthetic rule: the preferred reply repeats the prompt's word, the rejected one is another word.
    Full finetuning (a frozen copy is the reference); eval_loader logs the DPO metrics on held-out pairs."""
    from llmfoundry_lite import train
    held_out = string_pairs(64, seed=1)
    hf, data = dpo_inputs(tok, tmp_path, string_pairs(256), held_out)
    before = preference_accuracy(MPTForCausalLM.from_pretrained(hf), tok, held_out)
    eval_loader = {"name": "preference", "dataset": {"hf_name": str(data), "split": "test", "max_seq_len": 32}}
    trainer = train(YAML, [f"variables.model_name_or_path={hf}", f"variables.dpo_data={data}", "model.peft_config=null",
                           "max_seq_len=32", "max_duration=24ba", "global_train_batch_size=16", "save_folder=null",
                           "optimizer.lr=3e-3", "console_log_interval=100ba", "eval_interval=24ba",
                           f"eval_loader={json.dumps(eval_loader)}", "python_log_level=warning"])
    trainer.close()
    after = preference_accuracy(trainer.state.model.model, tok, held_out)
    assert 0.25 <= before <= 0.75 and after >= 0.9, (before, after)
    train_metrics = {k: v.compute().item() for k, v in trainer.state.train_metrics.items()}
    assert set(train_metrics) == {"DPOLoss", "RewardsChosen", "RewardsRejected", "RewardAccuracy", "RewardMargin",
                                  "LogpsChosen", "LogpsRejected"}
    evals = {k: v.compute().item() for k, v in trainer.state.eval_metrics["eval"].items()}
    assert evals["RewardAccuracy"] >= 0.9 and evals["DPOLoss"] < math.log(2) and evals["RewardMargin"] > 0, evals


def test_dpo_config_errors_name_their_keys(tmp_path):
    def problems(model=None, loader="preference", **top):
        dataset = {"hf_name": str(tmp_path), "max_seq_len": 16}
        cfg = {"model": {"name": "mpt_causal_lm", **TINY, **(model or {"loss_fn": "dpo"})},
               "tokenizer": {"name": "t"}, "max_duration": "4ba", "max_seq_len": 16,
               "train_loader": {"name": loader, "dataset": dataset}, "global_train_batch_size": 4, **top}
        with pytest.raises(ConfigError) as e:
            check_train_config(cfg)
        return "\n".join(e.value.problems)

    assert "train_loader.name: model.loss_fn dpo trains and evaluates on preference pairs; use name: preference" in (
        problems(loader="finetuning"))
    assert "train_loader.name: preference pairs need model.loss_fn: dpo" in problems(model={"init_device": "cpu"})
    found = problems(model={"loss_fn": "dpo", "dpo": {"beta": 0, "label_smoothing": 0.7, "variant": "kto",
                                                      "gamma": 1}})
    for fragment in ("model.dpo.beta: must be positive", "model.dpo.label_smoothing: must be in [0, 0.5)",
                     "model.dpo.variant:", "model.dpo.gamma: unknown key"):
        assert fragment in found, found
    assert "model.dpo.label_smoothing: applies to variant sigmoid only" in problems(
        model={"loss_fn": "dpo", "dpo": {"variant": "ipo", "label_smoothing": 0.1}})
    assert "model.dpo: only used with loss_fn: dpo" in problems(model={"dpo": {"beta": 0.2}}, loader="finetuning")
    found = problems(eval_loader=[{"name": "finetuning", "label": "a", "dataset": {"hf_name": "x", "max_seq_len": 8}}],
                     icl_tasks=[])
    assert "eval_loader[0].name: model.loss_fn dpo trains and evaluates on preference pairs" in found
    assert "icl_tasks: not supported with model.loss_fn dpo" in found
    packed_eval = {"name": "preference", "dataset": {"hf_name": str(tmp_path), "max_seq_len": 16, "packing_ratio": 2}}
    assert "eval_loader.dataset.packing_ratio: packing is for training" in problems(eval_loader=packed_eval)
    assert "MDS pairs were rendered and tokenized by data-prep preference" in problems(train_loader={
        "name": "preference", "dataset": {"local": str(tmp_path), "max_seq_len": 16, "preprocessing_fn": "hh_rlhf"}})
    (tmp_path / "ckpt.pt").touch()
    # a frozen copy's reference comes from the model section: right to resume this run, wrong for another's weights
    assert "load_weights_only: model.loss_fn dpo without LoRA takes its reference model from the model section" in (
        problems(load_path=str(tmp_path / "ckpt.pt"), load_weights_only=True))
    for ok in ({"load_path": str(tmp_path / "ckpt.pt")}, {"fsdp_config": {}}):  # resuming, sharding: fine
        check_train_config({"model": {"name": "mpt_causal_lm", **TINY, "loss_fn": "dpo", "init_device": "meta"},
                            "tokenizer": {"name": "t"}, "max_duration": "4ba", "max_seq_len": 16,
                            "train_loader": {"name": "preference", "dataset": {"hf_name": str(tmp_path),
                                                                               "max_seq_len": 16}},
                            "global_train_batch_size": 4, **ok}, world_size=2)
