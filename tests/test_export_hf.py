"""HF folders out and in: which configs export natively, the custom-code folder, and imports of
folders written by transformers and in MosaicML's original MPT layout."""
import ast
import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, MptConfig, MptForCausalLM

from llmfoundry_lite.compat.hf import STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP
from llmfoundry_lite.errors import CheckpointError
from llmfoundry_lite.export import load_hf_model, native_blockers, write_hf_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

from train_utils import mosaicml_hub_folder

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=96)


def _imported_packages(source: str) -> set:
    """Top-level package of every module-level import ('' for relative imports); flash-attn is
    imported inside a function, only when a config asks for it."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("" if node.level else node.module.split(".")[0])
    return names


def _model(**kw):
    torch.manual_seed(0)
    return MPTForCausalLM(MPTConfig(**{**TINY, **kw})).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


STOCK_ATTN_PDROP = 0.1 if STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP else 0  # see the test below

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


# Options stock transformers' Mpt computes exactly: they must export natively (and match).
@pytest.mark.parametrize("kw", [
    {},
    {"n_heads": 2, "d_model": 48, "attn_config": {"clip_qkv": 0.5, "softmax_scale": 0.3}},
    {"tie_word_embeddings": False, "norm_type": "layernorm", "layer_norm_epsilon": 1e-6},
    {"n_heads": 3, "d_model": 48, "attn_config": {"attn_pdrop": STOCK_ATTN_PDROP, "attn_uses_sequence_id": True},
     "resid_pdrop": 0.1, "emb_pdrop": 0.1, "embedding_fraction": 0.5, "init_device": "cpu"},
], ids=["default", "clip-softmax-scale", "untied-layernorm", "3-heads-dropout"])
def test_native_export_matches_stock_transformers(kw, tmp_path):
    model = _model(**kw)
    assert native_blockers(model.config) == []
    write_hf_folder(model.config, model.state_dict(), tmp_path, log=lambda m: None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mpt" and set(config) <= set(MptConfig().to_dict()) | {"architectures", "dtype"}
    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(stock) is MptForCausalLM
    torch.testing.assert_close(_logits(stock, IDS), _logits(model, IDS), rtol=0, atol=1e-5)


def test_fractional_attn_pdrop_is_native_where_stock_mpt_takes_it(tmp_path):
    """transformers 5's MptConfig refuses attn_pdrop 0.1 (typed int); such a model then exports with its code."""
    try:
        MptConfig(attn_config={"attn_pdrop": 0.1})
        stock_takes_it = True
    except Exception:  # noqa: BLE001  (transformers 5: huggingface_hub's StrictDataclassFieldValidationError)
        stock_takes_it = False
    assert stock_takes_it == STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP
    model = _model(attn_config={"attn_pdrop": 0.1})
    assert bool(native_blockers(model.config)) != stock_takes_it
    write_hf_folder(model.config, model.state_dict(), tmp_path, log=lambda m: None)
    torch.testing.assert_close(_logits(load_hf_model(str(tmp_path)), IDS), _logits(model, IDS), rtol=0, atol=1e-5)


# Options stock transformers' Mpt does not implement: each must be named, and block a native export.
BLOCKING = [
    ({"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}}, "attn_config.attn_type"),
    ({"attn_config": {"attn_type": "multiquery_attention"}}, "attn_config.attn_type"),
    ({"attn_config": {"qk_ln": True}}, "attn_config.qk_ln"),
    ({"attn_config": {"qk_gn": True}}, "attn_config.qk_gn"),
    ({"attn_config": {"alibi": False, "rope": True}}, "attn_config.rope"),
    ({"attn_config": {"alibi": False}, "learned_pos_emb": True}, "attn_config.alibi"),
    ({"attn_config": {"alibi_bias_max": 4}}, "attn_config.alibi_bias_max"),
    ({"attn_config": {"sliding_window_size": 4}}, "attn_config.sliding_window_size"),
    ({"attn_config": {"fused_qkv": False}}, "attn_config.fused_qkv"),
    ({"no_bias": False}, "no_bias"),
    ({"norm_type": "rmsnorm"}, "norm_type"),
    ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_config.ffn_type"),
    ({"ffn_config": {"ffn_act_fn": {"name": "silu"}}}, "ffn_config.ffn_act_fn"),
    ({"expansion_ratio": 2}, "expansion_ratio"),
    ({"logit_scale": "inv_sqrt_d_model"}, "logit_scale"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
]


@pytest.mark.parametrize("kw,key", BLOCKING, ids=[k for _, k in BLOCKING])
def test_each_unsupported_option_blocks_native_export(kw, key):
    blockers = native_blockers(MPTConfig(**{**TINY, **kw}))
    assert any(b.startswith(key) for b in blockers), blockers


@pytest.mark.parametrize("kw", [
    {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True}, "no_bias": False},
    {"attn_config": {"alibi": False, "rope": True}, "ffn_config": {"ffn_type": "mptglu"}, "norm_type": "rmsnorm",
     "logit_scale": 0.5, "tie_word_embeddings": False},
    {"attn_config": {"alibi": False}, "learned_pos_emb": True, "expansion_ratio": 2},
], ids=["gqa-qkln-bias", "rope-glu-rms-logitscale", "learned-pos"])
def test_custom_code_folder_loads_with_trust_remote_code_and_matches(kw, tmp_path):
    model = _model(**kw)
    messages = []
    write_hf_folder(model.config, model.state_dict(), tmp_path, log=messages.append)
    assert "trust_remote_code" in messages[0] and all(b.split(" ")[0] in messages[0]
                                                      for b in native_blockers(model.config))
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["configuration_mpt.py", "modeling_mpt.py"]
    for code in tmp_path.glob("*.py"):  # self-contained: only torch, transformers and the stdlib
        assert _imported_packages(code.read_text()) <= {"torch", "transformers", ""} | sys.stdlib_module_names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__.endswith("modeling_mpt")
    torch.testing.assert_close(_logits(loaded, IDS), _logits(model, IDS), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code"):  # never silently a stock (wrong) Mpt
        AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False)
    torch.testing.assert_close(_logits(load_hf_model(str(tmp_path)), IDS), _logits(model, IDS), rtol=0, atol=0)


def test_streamed_shards_respect_the_size_limit_and_round_trip(tmp_path):
    model = _model()
    write_hf_folder(model.config, model.state_dict(), tmp_path, dtype=torch.float16, max_shard_size="20KB",
                    log=lambda m: None)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and "lm_head.weight" not in index["weight_map"]  # tied: stored once, as wte
    largest = max(t.numel() * 2 for t in model.state_dict().values())
    assert all((tmp_path / s).stat().st_size <= max(20_000, largest) + 4096 for s in shards)
    reloaded = load_hf_model(str(tmp_path))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name].float(), tensor.half().float(), rtol=0, atol=0)


def test_import_folder_saved_by_transformers(tmp_path):
    torch.manual_seed(0)
    stock = MptForCausalLM(MptConfig(d_model=48, n_heads=6, n_layers=2, max_seq_len=32, vocab_size=96)).eval()
    stock.save_pretrained(tmp_path)
    ours = load_hf_model(str(tmp_path))
    assert isinstance(ours, MPTForCausalLM)
    torch.testing.assert_close(_logits(ours, IDS), _logits(stock, IDS), rtol=0, atol=1e-5)
    longer = load_hf_model(str(tmp_path), max_seq_len=64)  # ALiBi extrapolation, as the MPT-7B card does
    assert longer.config.max_seq_len == 64


def test_import_original_mosaicml_layout(tmp_path):
    stock = mosaicml_hub_folder(str(tmp_path))
    ours = load_hf_model(str(tmp_path))
    assert ours.config.attn_config["attn_impl"] == "torch"
    torch.testing.assert_close(_logits(ours, IDS), _logits(stock, IDS), rtol=0, atol=1e-5)


def test_storywriter_style_max_seq_len_raise_on_the_command_line(tmp_path, tiny_tokenizer_dir):
    """As MPT-7B-StoryWriter's card raises max_seq_len past its training length (ALiBi extrapolates):
    `--max_seq_len` lets generate/chat/serve take longer inputs, with stock transformers' logits at that length."""
    from llmfoundry_lite.errors import UserError
    from llmfoundry_lite.inference import load_model_and_tokenizer
    folder = str(tmp_path / "storywriter")
    mosaicml_hub_folder(folder, max_seq_len=16)
    longer = torch.randint(0, 96, (1, 40))
    model, _ = load_model_and_tokenizer(folder, tokenizer=tiny_tokenizer_dir, max_seq_len=64)
    stock = MptForCausalLM.from_pretrained(folder, config=MptConfig.from_pretrained(folder, max_seq_len=64)).eval()
    torch.testing.assert_close(_logits(model, longer), _logits(stock, longer), rtol=0, atol=1e-5)
    short, _ = load_model_and_tokenizer(folder, tokenizer=tiny_tokenizer_dir)
    with pytest.raises(UserError, match="longer than max_seq_len"):
        short(input_ids=longer)
    learned = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=16, vocab_size=96,
                                       attn_config={"alibi": False}))
    write_hf_folder(learned.config, learned.state_dict(), tmp_path / "learned", log=lambda m: None)
    with pytest.raises(UserError, match="learned position embeddings for 16 positions"):
        load_model_and_tokenizer(str(tmp_path / "learned"), tokenizer=tiny_tokenizer_dir, max_seq_len=64)


def test_import_refuses_other_architectures_and_incomplete_weights(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="'gpt2' model"):
        load_hf_model(str(tmp_path / "gpt2"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_model(str(tmp_path))
    model = _model()
    partial = {k: v for k, v in model.state_dict().items() if "blocks.1.ffn" not in k}
    with pytest.raises(CheckpointError, match="missing .*blocks.1.ffn"):  # export refuses it up front
        write_hf_folder(model.config, partial, tmp_path / "partial", log=lambda m: None)
    write_hf_folder(model.config, model.state_dict(), tmp_path / "partial", log=lambda m: None)
    partial.pop("lm_head.weight")  # tied: stored as wte only
    save_file(partial, tmp_path / "partial" / "model.safetensors")  # a folder damaged after export
    with pytest.raises(CheckpointError, match="missing"):
        load_hf_model(str(tmp_path / "partial"))
