"""`data-prep preference`: preference pairs -> tokenized MDS, counting what it read, wrote and dropped;
with `--reference_model`, the reference model's log-probabilities stored in the shards. Training from
those shards keeps no reference model, and its losses equal those of a run with the live reference;
pairs that no longer fit, a folder that is no model and loaders that mix the two kinds are named."""
import json
import os

import numpy as np
import pytest
import torch
from streaming import StreamingDataset
from test_dpo import TINY, YAML, dpo_inputs, string_pairs

from llmfoundry_lite.cli import main
from llmfoundry_lite.data.preference import PreferenceDataset
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.prep.preference import score_pairs

from train_utils import read_losses

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def prep(*argv):
    return main(["data-prep", "preference", *argv])


def read_mds(folder):
    ds = StreamingDataset(local=str(folder), batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    """A start model, JSONL pairs, and their MDS (train with reference log-probabilities, test without)."""
    root = tmp_path_factory.mktemp("dpo_prep")
    hf, data = dpo_inputs(tok, root, string_pairs(48), string_pairs(16, seed=1))
    with open(data / "train.jsonl", "a") as f:  # three pairs to drop, one prompt to cut
        f.write(json.dumps({"prompt": "Repeat red", "chosen": " red", "rejected": " red"}) + "\n")
        f.write(json.dumps({"prompt": "", "chosen": " red", "rejected": " blue"}) + "\n")
        f.write(json.dumps({"prompt": "Repeat red", "chosen": " red" * 40, "rejected": " blue"}) + "\n")
        f.write(json.dumps({"prompt": "Say it again: " * 8 + "red", "chosen": " red", "rejected": " blue"}) + "\n")
    tokenizer = os.fspath(hf)
    for split, extra in (("train", ["--reference_model", os.fspath(hf), "--batch_size", "5"]), ("test", [])):
        assert prep("--dataset", os.fspath(data / f"{split}.jsonl"), "--splits", split, "--out_root",
                    os.fspath(root / "mds"), "--tokenizer", tokenizer, "--max_seq_len", "32", *extra) == 0
    return hf, data, root / "mds"


def test_shards_hold_the_tokenized_pairs_and_the_counts_are_printed(prepared, tok, capsys):
    hf, data, mds = prepared
    rows = [json.loads(line) for line in open(data / "train.jsonl")]
    expected = PreferenceDataset(rows, tok, 32)
    stored = read_mds(mds / "train")
    assert len(stored) == len(expected) == 49   # 48 + the cut one
    for s, e in zip(stored, expected, strict=True):
        assert {k: s[k].tolist() for k in ("prompt", "chosen", "rejected")} == e
    assert expected.stats == {"pairs": 52, "prompt truncated": 1, "dropped too long": 1,
                              "dropped chosen equals rejected": 1, "dropped empty": 1}
    assert "reference_logps" not in read_mds(mds / "test")[0]

    prep("--dataset", os.fspath(data / "train.jsonl"), "--splits", "train", "--out_root", os.fspath(mds.parent / "again"),
         "--tokenizer", os.fspath(hf), "--max_seq_len", "32")
    out = capsys.readouterr().out
    assert ("52 pairs, 1 prompt truncated, 1 dropped too long, 1 dropped chosen equals rejected, 1 dropped empty, "
            "49 written") in out


def test_stored_reference_logps_are_the_reference_models(prepared, tok):
    hf, _, mds = prepared
    stored = read_mds(mds / "train")
    pairs = [{k: s[k].tolist() for k in ("prompt", "chosen", "rejected")} for s in stored]
    live = torch.cat([score_pairs(MPTForCausalLM.from_pretrained(hf), [p], tok.pad_token_id) for p in pairs])
    saved = torch.from_numpy(np.stack([s["reference_logps"] for s in stored]))
    assert saved.dtype == torch.float32 and saved.shape == (49, 2)
    assert torch.allclose(saved, live, atol=1e-5), (saved - live).abs().max()


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_precomputed_reference_trains_like_the_live_reference_without_a_copy(prepared, tmp_path, packed):
    """Full finetuning, 6 steps in the shards' order: the same losses within 1e-5, and no frozen copy.
    Packed: 4 rows of 8 pairs per batch, from shards prepared with --packed (prompts cut to fit a row)."""
    from llmfoundry_lite import train
    hf, data, mds = prepared
    rows = [json.loads(line) for line in open(data / "train.jsonl")]
    (tmp_path / "live").mkdir()
    (tmp_path / "live" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [f"variables.model_name_or_path={hf}", "model.peft_config=null", "max_seq_len=32", "max_duration=6ba",
              "global_train_batch_size=8", "save_folder=null", "console_log_interval=100ba", "python_log_level=warning",
              "train_loader.dataset.shuffle=false", "callbacks={}"]
    if packed:
        mds = tmp_path / "mds"
        assert prep("--dataset", os.fspath(data / "train.jsonl"), "--splits", "train", "--out_root", os.fspath(mds),
                    "--tokenizer", os.fspath(hf), "--max_seq_len", "32", "--reference_model", os.fspath(hf),
                    "--packed") == 0
        common += ["train_loader.dataset.packing_ratio=2", "global_train_batch_size=4",
                   "model.config_overrides={attn_config: {attn_uses_sequence_id: true}}"]
    runs = {}
    for name, source in (("live", [f"variables.dpo_data={tmp_path / 'live'}"]),
                         ("precomputed", ["train_loader.dataset.hf_name=null", f"train_loader.dataset.local={mds}",
                                          "train_loader.dataset.split=train"])):
        trainer = train(YAML, [*common, *source, f"loggers={{jsonl: {{path: {tmp_path / name}.jsonl}}}}"])
        trainer.close()
        runs[name] = trainer.state.model
    live, pre = runs.values()
    assert live._frozen and not pre._frozen and not pre.live_reference
    a, b = ([loss for _, loss in read_losses(f"{tmp_path / name}.jsonl")] for name in runs)
    assert len(a) == len(b) == 6 and a[0] == pytest.approx(np.log(2), abs=1e-5)
    assert np.allclose(a, b, atol=1e-5), (a, b)


def test_pairs_that_no_longer_fit_and_mixed_loaders_are_named(prepared, tmp_path, capsys):
    from llmfoundry_lite import train
    hf, data, mds = prepared
    base = [f"variables.model_name_or_path={hf}", "model.peft_config=null", "max_duration=1ba", "save_folder=null",
            "global_train_batch_size=8", "train_loader.dataset.hf_name=null", f"train_loader.dataset.local={mds}",
            "train_loader.dataset.split=train", "python_log_level=warning", "callbacks={}"]
    with pytest.raises(DataError, match="does not fit the loader.s max_seq_len 8 whole, as its reference_logps need"):
        train(YAML, [*base, "max_seq_len=8"]).close()
    eval_loader = {"name": "preference", "dataset": {"hf_name": str(data), "split": "test", "max_seq_len": 32}}
    with pytest.raises(DataError, match="eval_loader eval: its preference pairs carry no reference_logps"):
        train(YAML, [*base, "max_seq_len=32", f"eval_loader={json.dumps(eval_loader)}"]).close()

    assert main(["data-prep", "preference", "--dataset", os.fspath(data / "test.jsonl"), "--out_root",
                 os.fspath(tmp_path / "x"), "--tokenizer", os.fspath(hf), "--max_seq_len", "32",
                 "--reference_model", os.fspath(data)]) == 2
    err = capsys.readouterr().err
    assert "has no config.json: not a Hugging Face model folder" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "x" / "train")


def test_bad_rows_are_named_or_skipped_and_counted(prepared, tmp_path, capsys):
    hf, _, _ = prepared
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Repeat red", "chosen": " red", "rejected": " blue"}) + "\n"
                   + '{"prompt": "Repeat red", "chosen": \n'
                   + json.dumps({"prompt": "Repeat red", "chosen": " red", "rejected": [{"role": "user"}]}) + "\n")
    args = ["--dataset", os.fspath(bad), "--splits", "train", "--tokenizer", os.fspath(hf), "--max_seq_len", "32"]
    assert prep(*args, "--out_root", os.fspath(tmp_path / "strict")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "strict" / "train")       # nothing half-written
    assert prep(*args, "--out_root", os.fspath(tmp_path / "lenient"), "--skip_bad_lines") == 0
    out = capsys.readouterr().out
    assert "2 pairs" in out and "1 skipped invalid" in out and "1 written" in out and "1 malformed" in out, out
    assert len(read_mds(tmp_path / "lenient" / "train")) == 1


def test_reference_logps_of_another_model_are_named_on_the_first_batch(prepared, tok, tmp_path, caplog):
    from llmfoundry_lite import train
    hf, data, mds = prepared
    torch.manual_seed(1)
    MPTForCausalLM(MPTConfig(**TINY)).save_pretrained(tmp_path / "other")
    assert prep("--dataset", os.fspath(data / "train.jsonl"), "--splits", "train", "--out_root", os.fspath(tmp_path / "mds"),
                "--tokenizer", os.fspath(hf), "--max_seq_len", "32", "--reference_model", os.fspath(tmp_path / "other")) == 0
    base = [f"variables.model_name_or_path={hf}", "max_seq_len=32", "max_duration=2ba", "save_folder=null",
            "global_train_batch_size=8", "train_loader.dataset.hf_name=null", "train_loader.dataset.split=train",
            "python_log_level=warning", "callbacks={}"]
    for shards in (mds, tmp_path / "mds"):  # this run's start (LoRA: the base model), then another model
        caplog.clear()
        train(YAML, [*base, f"train_loader.dataset.local={shards}"]).close()
        warned = [r.getMessage() for r in caplog.records if "stored reference_logps differ" in r.getMessage()]
        assert len(warned) == (shards != mds), warned
    assert "--reference_model set to the folder this run starts from" in warned[0]
