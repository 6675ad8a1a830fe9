"""Packing of preference pairs for DPO (`train_loader.dataset.packing_ratio`): a packed batch has the
layout the DPO loss reads (both sides of a pair in one row, sequence ids 2j / 2j+1, pair_mask), every
pair once; its per-pair log-probabilities, loss and metrics outputs equal those of the same pairs
unpacked (ALiBi and learned positions); a short packed run has fewer rows than pairs and the losses of
the unpacked run on the same pairs; packing is refused unless the model attends by sequence_id."""

import pytest
import torch
from test_dpo import TINY, YAML, dpo_inputs

from llmfoundry_lite.data.collators import PreferenceCollator, PreferencePackingCollator
from llmfoundry_lite.data.loaders import build_dataloader
from llmfoundry_lite.data.preference import PreferenceDataset, pair_length
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.training.objectives.dpo import ComposerMPTDPO

from train_utils import read_losses

pytestmark = pytest.mark.usefixtures("torch_one_thread")
WORDS = ["red", "blue", "green", "black", "white", "brown", "pink", "gold"]


def varied_pairs(n):
    """Distinct string pairs (for n <= 24) of varied lengths: prompts of 1-3 words, rejected replies of 1-2."""
    return [{"prompt": " ".join(WORDS[(i + j) % 8] for j in range(1 + i % 3)), "chosen": f" {WORDS[i % 8]}",
             "rejected": f" {WORDS[(i + 3) % 8]}" + f" {WORDS[(i + 5) % 8]}" * (i % 2)} for i in range(n)]


def packed_pairs_in_order(batch, pairs):
    """Checks the packed layout against the pairs and returns, in the batch's pair order (row by row),
    the index of each pair in `pairs`: every pair once, its chosen side as sequence 2j and its rejected
    side as 2j+1 of one row, padding -1 with attention_mask 0 and labels -100."""
    sides = {(tuple(p["prompt"] + p["chosen"]), tuple(p["prompt"] + p["rejected"])): k for k, p in enumerate(pairs)}
    order = []
    for r in range(batch["input_ids"].shape[0]):
        seq, ids = batch["sequence_id"][r], batch["input_ids"][r]
        n_pairs = int(batch["pair_mask"][r].sum())
        assert batch["pair_mask"][r].tolist() == [True] * n_pairs + [False] * (batch["pair_mask"].shape[1] - n_pairs)
        used = int((seq >= 0).sum())
        # sequences 0, 1, ..., 2 * n_pairs - 1 one after the other, then padding
        assert seq[:used].unique_consecutive().tolist() == list(range(2 * n_pairs)) and (seq[used:] == -1).all()
        assert batch["attention_mask"][r].tolist() == [1] * used + [0] * (len(seq) - used)
        assert (batch["labels"][r, used:] == -100).all()
        for j in range(n_pairs):
            chosen, rejected = tuple(ids[seq == 2 * j].tolist()), tuple(ids[seq == 2 * j + 1].tolist())
            k = sides[(chosen, rejected)]
            reply = pairs[k]["chosen"]
            assert batch["labels"][r][seq == 2 * j].tolist() == [-100] * (len(chosen) - len(reply)) + reply
            order.append(k)
    assert sorted(order) == list(range(len(pairs)))  # every pair once
    return order


@pytest.mark.parametrize("positions", [{}, {"alibi": False}], ids=["alibi", "learned"])
def test_packed_batch_equals_unpacked(tok, positions):
    pairs = PreferenceDataset(varied_pairs(10), tok, 64, packed=True)
    unpacked = PreferenceCollator(tok.pad_token_id, 64)(pairs)
    packed = PreferencePackingCollator(tok.pad_token_id, 64, rows=10)(pairs)
    assert packed["input_ids"].shape[0] < len(pairs) and packed["pair_mask"].shape[1] >= 2
    order = packed_pairs_in_order(packed, pairs)

    torch.manual_seed(0)
    config = MPTConfig(**TINY, attn_config={"attn_uses_sequence_id": True, **positions})
    model = ComposerMPTDPO(MPTForCausalLM(config), tok).eval()
    model.make_reference()  # the frozen copy of the start (train() makes it before a checkpoint is read)
    with torch.no_grad():
        for p in model.model.parameters():  # a policy away from the (frozen) reference: a loss other than log 2
            p.add_(0.05 * torch.randn_like(p))
        out_u, out_p = model(unpacked), model(packed)
    assert abs(out_u["loss"].item() - 0.6931) > 1e-3
    assert out_p["loss"].item() == pytest.approx(out_u["loss"].item(), abs=1e-5)
    for key, value in out_u.items():
        if key != "loss":  # per pair: the policy's log-probs, the rewards, the losses, ...
            assert torch.allclose(out_p[key], value[order], atol=1e-5), key


def test_reference_logps_and_dropped_leftovers(tok):
    """Pairs' reference_logps ride along ([B, 2], or [R, P, 2] packed); pairs dropped as leftovers are counted."""
    pairs = [{**p, "reference_logps": [-1.0 - k, -2.0 - k]}
             for k, p in enumerate(PreferenceDataset(varied_pairs(6), tok, 64, packed=True))]
    assert PreferenceCollator(tok.pad_token_id, 64)(pairs)["reference_logps"].tolist() == [p["reference_logps"]
                                                                                           for p in pairs]
    batch = PreferencePackingCollator(tok.pad_token_id, 64, rows=6)(pairs)
    order = packed_pairs_in_order(batch, pairs)
    ref, mask = batch["reference_logps"], batch["pair_mask"]
    assert ref.shape == (*mask.shape, 2) and (ref[~mask] == 0).all()
    assert ref[mask].tolist() == [pairs[k]["reference_logps"] for k in order]
    # one row per batch and no leftover bins kept: the pairs beyond the fullest row are dropped, and counted
    collate = PreferencePackingCollator(tok.pad_token_id, 64, rows=1, max_leftover_bins_to_keep=0)
    kept = int(collate(pairs)["pair_mask"].sum())
    assert kept < len(pairs) and collate.stats["dropped leftover pairs"] == len(pairs) - kept
    assert collate.stats["pairs"] == len(pairs) and collate.leftover == []


def test_packed_pairs_fit_a_row(tok):
    """Packed, both sides share a row: the prompt is cut so that the pair fits, and that is counted."""
    row = {"prompt": " ".join(["word"] * 8), "chosen": " a", "rejected": " b c"}
    alone, packed = PreferenceDataset([row], tok, 32), PreferenceDataset([row], tok, 32, packed=True)
    assert alone.stats["prompt truncated"] == 0 and packed.stats["prompt truncated"] == 1
    assert pair_length(alone[0]) > 32 >= pair_length(packed[0]) >= 31
    assert packed[0]["prompt"] == alone[0]["prompt"][-len(packed[0]["prompt"]):]


def test_packed_run_has_the_unpacked_runs_losses(tok, tmp_path):
    """16 pairs, no shuffling: 8 pairs a step either way (the packed run: 4 rows, packing_ratio 2, every
    step's 8 pairs fit), so both runs train on the same pairs and log the same losses; the packed run in
    microbatches of 2 rows, which hold unequal numbers of pairs (a step's loss is still its pairs' mean)."""
    pairs = varied_pairs(16)
    hf, data = dpo_inputs(tok, tmp_path, pairs)
    common = [f"variables.model_name_or_path={hf}", f"variables.dpo_data={data}", "model.peft_config=null",
              "max_seq_len=64", "max_duration=3ba", "save_folder=null", "optimizer.lr=3e-3",
              "train_loader.dataset.shuffle=false", "python_log_level=warning", "scheduler=null",
              "model.config_overrides.attn_config.attn_uses_sequence_id=true"]
    packing = ["global_train_batch_size=4", "train_loader.dataset.packing_ratio=2", "device_train_microbatch_size=2"]
    loader = {"name": "preference", "dataset": {"hf_name": str(data), "max_seq_len": 64, "packing_ratio": 2}}
    for batch in build_dataloader(loader, tok, 4):
        assert batch["pair_mask"].sum() == 8 and batch["input_ids"].shape[0] <= 4  # fewer rows than pairs
    loader["dataset"]["packing_ratio"] = "auto"  # from the pairs' lengths (12-35 tokens in rows of 64)
    assert build_dataloader(loader, tok, 4).batch_size > 4
    from llmfoundry_lite import train
    losses, metrics = [], []
    for name, extra in (("unpacked", ["global_train_batch_size=8"]), ("packed", packing)):
        log = tmp_path / f"{name}.jsonl"
        trainer = train(YAML, common + extra + [f"loggers.jsonl.path={log}"])
        trainer.close()
        losses.append(read_losses(log))
        metrics.append({k: v.compute().item() for k, v in trainer.state.train_metrics.items()})
    (unpacked, packed), (m_unpacked, m_packed) = losses, metrics
    assert [s for s, _ in packed] == [s for s, _ in unpacked] == [0, 1, 2]
    assert [loss for _, loss in packed] == pytest.approx([loss for _, loss in unpacked], abs=1e-5), (packed, unpacked)
    assert unpacked[-1][1] < unpacked[0][1], unpacked  # it trained
    assert m_packed == pytest.approx(m_unpacked, abs=1e-4)  # the last step's DPO metrics


def test_packing_needs_a_model_that_attends_by_sequence_id(tok, tmp_path):
    from llmfoundry_lite.training.schema import check_train_config

    def config(model):
        return {"model": {"loss_fn": "dpo", **model}, "tokenizer": {"name": "t"}, "max_duration": "4ba",
                "max_seq_len": 16, "global_train_batch_size": 4, "train_loader": {"name": "preference", "dataset": {
                    "hf_name": str(tmp_path), "max_seq_len": 16, "packing_ratio": "auto"}}}

    def problems(model):
        with pytest.raises(ConfigError) as e:
            check_train_config(config(model))
        return str(e.value)

    assert ("model.attn_config.attn_uses_sequence_id: must be true to pack preference pairs "
            "(train_loader.dataset.packing_ratio)") in problems({"name": "mpt_causal_lm", **TINY})
    check_train_config(config({"name": "mpt_causal_lm", **TINY, "attn_config": {"attn_uses_sequence_id": True}}))
    hf, data = dpo_inputs(tok, tmp_path, varied_pairs(8))
    found = problems({"name": "hf_causal_lm", "pretrained_model_name_or_path": str(hf),
                      "config_overrides": {"attn_config": {"attn_uses_sequence_id": False}}})
    assert "model.config_overrides.attn_config.attn_uses_sequence_id: must be true to pack preference pairs" in found
    # the YAML does not say: the folder's config (false) is checked when the model is opened
    from llmfoundry_lite import train
    with pytest.raises(ConfigError) as e:
        train(YAML, [f"variables.model_name_or_path={hf}", f"variables.dpo_data={data}", "save_folder=null",
                     "train_loader.dataset.packing_ratio=auto", "global_train_batch_size=2"])
    assert ("model.config_overrides.attn_config.attn_uses_sequence_id: must be true to pack preference pairs "
            f"(train_loader.dataset.packing_ratio): the two sides of a pair and the other pairs of a row must not "
            f"attend to each other (the config of {hf} has it false); set "
            "model.config_overrides.attn_config.attn_uses_sequence_id: true") in str(e.value)
