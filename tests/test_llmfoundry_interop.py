"""Models llm-foundry 0.22 saved (`tests/fixtures/llmfoundry/`, written by llm-foundry itself through
`tests/make_llmfoundry_fixtures.py`) load here with every key it writes, and give llm-foundry's logits."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.export import load_hf_model, native_blockers, write_hf_folder

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llmfoundry")
CASES = sorted(os.listdir(FIXTURES))


def llmfoundry_logits_match(model, folder, padding_too=False):
    expected = load_file(os.path.join(folder, "expected.safetensors"))
    mask = expected["attention_mask"]
    with torch.no_grad():
        logits = model(input_ids=expected["input_ids"], attention_mask=mask).logits
    # a padded position's logits depend on how positions count padding, except with ALiBi (right padding)
    compared = torch.ones_like(mask, dtype=torch.bool) if padding_too else mask.bool()
    torch.testing.assert_close(logits[compared], expected["logits"][compared], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_a_model_llmfoundry_saved_loads_with_its_logits(case):
    folder = os.path.join(FIXTURES, case)
    llmfoundry_logits_match(load_hf_model(folder), folder)


def test_padding_tokens_skip_the_ffn_as_in_llmfoundry():
    """use_pad_tok_in_ffn: false changes only padded positions: those are compared too (ALiBi, right padding)."""
    folder = os.path.join(FIXTURES, "no_pad_tok_in_ffn")
    llmfoundry_logits_match(load_hf_model(folder), folder, padding_too=True)
    with pytest.raises(AssertionError):  # the padded positions do tell the two apart
        llmfoundry_logits_match(load_hf_model(folder, use_pad_tok_in_ffn=True), folder, padding_too=True)


@pytest.mark.parametrize("case", ["defaults", "rmsnorm_with_biases", "attention_bias_only", "head_dim_unfused",
                                  "block_overrides_unfused_gqa_alibi", "block_overrides_dail_nope_reuse",
                                  "block_overrides_reuse_kv_x_gqa",
                                  "rope_dail_xpos", "rope_hf_linear", "rope_hf_llama3", "head_dim_dail", "head_dim_dail_xpos_gqa", "no_pad_tok_in_ffn", "torch_dmoe_mlp", "torch_dmoe_glu_silu"])
def test_its_export_keeps_the_logits(case, tmp_path):
    """Exported again (custom code where stock transformers cannot represent it), the same logits."""
    folder = os.path.join(FIXTURES, case)
    model = load_hf_model(folder)
    assert native_blockers(model.config)  # biases, positions, head size, overrides: not stock Mpt
    write_hf_folder(model.config, model.state_dict(), str(tmp_path / "out"))
    llmfoundry_logits_match(load_hf_model(str(tmp_path / "out")), folder)


def test_triton_rmsnorm_is_the_same_rms_norm():
    """llm-foundry's `triton_rmsnorm` (a flash-attn kernel) computes what its `rmsnorm` does."""
    folder = os.path.join(FIXTURES, "rmsnorm_with_biases")
    llmfoundry_logits_match(load_hf_model(folder, norm_type="triton_rmsnorm"), folder)


def test_rms_norms_have_no_bias_like_llmfoundrys():
    with open(os.path.join(FIXTURES, "rmsnorm_with_biases", "config.json")) as f:
        assert json.load(f)["no_bias"] is False
    names = load_hf_model(os.path.join(FIXTURES, "rmsnorm_with_biases")).state_dict()
    assert "transformer.blocks.0.norm_1.weight" in names and "transformer.blocks.0.norm_1.bias" not in names
    assert "transformer.blocks.0.attn.Wqkv.bias" in names


@pytest.mark.parametrize("key, value, message", [
    ("attn_config", {"nope": True}, "attn_config.nope: a model without positions is not an option (as in "
                                    "llm-foundry): make single layers nope in block_overrides"),
    ("attn_config", {"kv_dim": 16}, "attn_config.kv_dim: 16 != d_model (32): keys of another width are for "
                                    "cross-attention"),
    ("fc_type", {"name": "te"}, "fc_type: only 'torch' linear layers are supported (TransformerEngine's 'te'"),
    ("ffn_config", {"ffn_type": "te_ln_mlp"}, "ffn_config.ffn_type: 'te_ln_mlp' is not supported: "
                                              "TransformerEngine's fused LayerNorm-MLP needs NVIDIA's transformer_engine"),
    ("ffn_config", {"ffn_type": "mb_moe"}, "ffn_config.ffn_type: 'mb_moe' is not supported: MegaBlocks' mixture of "
                                           "experts needs MegaBlocks' CUDA kernels"),
    ("ffn_config", {"ffn_type": "mb_dmoe", "moe_world_size": 1}, "ffn_config.ffn_type: 'mb_dmoe' is not supported"),
    ("ffn_config", {"ffn_type": "torch_dmoe", "moe_world_size": 1, "moe_loss_weight": 0.1},
     "ffn_config.moe_loss_weight: a MegaBlocks key (ffn_type mb_moe / mb_dmoe, which need MegaBlocks' CUDA kernels"),
])
def test_what_is_not_implemented_yet_is_a_clear_error(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_hf_model(os.path.join(FIXTURES, "head_dim_unfused"), learned_pos_emb=False, **{key: value})


def test_torch_dmoe_has_llmfoundrys_weights_and_no_extra_loss():
    """Its saved folder holds the router and the stacked experts, no biases (although no_bias is false there);
    like llm-foundry's torch_dmoe the training loss is the language-model loss alone (no load balancing)."""
    folder = os.path.join(FIXTURES, "torch_dmoe_glu_silu")
    model = load_hf_model(folder)
    names = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".blocks.0.ffn." in k}
    assert names == {"transformer.blocks.0.ffn.router.layer.weight": (3, 32),
                     **{f"transformer.blocks.0.ffn.experts.mlp.{w}": (3 * 24, 32) for w in ("w1", "v1", "w2")}}
    ids = load_file(os.path.join(folder, "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        out = model(ids, labels=ids)
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, shifted)


@pytest.mark.parametrize("case", ["torch_dmoe_mlp", "torch_dmoe_glu_silu"])
def test_its_mixture_of_experts_exports_as_custom_code_with_its_logits(case, tmp_path):
    """Stock transformers' Mpt has no MoE: the export is a custom-code folder, whose bundled source runs it."""
    from transformers import AutoModelForCausalLM

    folder = os.path.join(FIXTURES, case)
    model = load_hf_model(folder)
    assert any(b.startswith("ffn_config.ffn_type = 'torch_dmoe'") for b in native_blockers(model.config))
    write_hf_folder(model.config, model.state_dict(), str(tmp_path), log=lambda m: None)
    assert json.loads((tmp_path / "config.json").read_text())["ffn_config"]["moe_num_experts"] == \
        model.config.ffn_config["moe_num_experts"]
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), trust_remote_code=True).eval()
    assert type(loaded).__module__.endswith("modeling_mpt")
    llmfoundry_logits_match(loaded, folder)


def custom_code_runs_like_llmfoundry(folder, out):
    """The model's export to `out` (custom code), loaded by transformers with trust_remote_code: llm-foundry's
    logits, and a cached decode equal to the full forward (as in llm-foundry). Returns the written config."""
    from transformers import AutoModelForCausalLM

    model = load_hf_model(folder)
    write_hf_folder(model.config, model.state_dict(), str(out), log=lambda m: None)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    assert type(loaded).__module__.endswith("modeling_mpt")
    llmfoundry_logits_match(loaded, folder)
    ids = load_file(os.path.join(folder, "expected.safetensors"))["input_ids"]
    with torch.no_grad():
        full = loaded(ids).logits[:, -3:]
        past = loaded(ids[:, :-3], use_cache=True).past_key_values
        step = loaded(ids[:, -3:], past_key_values=past, use_cache=True).logits
    torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
    return json.loads((out / "config.json").read_text())


def test_reuse_kv_x_layers_export_as_custom_code_with_its_logits_and_cache(tmp_path):
    """Layers whose keys read an earlier layer's input (llm-foundry's reuse_kv_x_layer_idx): its weight names,
    the bundled custom code runs them, and a cached decode equals the full forward (as in llm-foundry)."""
    folder = os.path.join(FIXTURES, "block_overrides_reuse_kv_x_gqa")
    names = set(load_hf_model(folder).state_dict())
    assert names == set(load_file(os.path.join(folder, "model.safetensors"))) | {"lm_head.weight"}
    written = custom_code_runs_like_llmfoundry(folder, tmp_path)["block_overrides"]
    assert written["overrides"]["reuse_x"]["attn_config"]["reuse_kv_x_layer_idx"] == -1  # relative, as written


def test_llama3_rope_exports_as_custom_code_with_its_logits_and_cache(tmp_path):
    """Stock transformers' Mpt has no RoPE: the bundled custom code carries rope_hf_config's llama3 scaling."""
    folder = os.path.join(FIXTURES, "rope_hf_llama3")
    assert "attn_config.rope = True: stock Mpt has no RoPE" in native_blockers(load_hf_model(folder).config)
    written = custom_code_runs_like_llmfoundry(folder, tmp_path)["attn_config"]["rope_hf_config"]
    with open(os.path.join(folder, "config.json")) as f:
        assert written == json.load(f)["attn_config"]["rope_hf_config"]  # as llm-foundry wrote it
