"""Writes tests/fixtures/llmfoundry/<case>/: tiny MPT models saved by llm-foundry itself, with its logits.

Run it with llm-foundry installed in a throwaway venv (it is never a dependency of this project; the
tests only read what this writes):

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install "llm-foundry==0.22.*"
    /tmp/lf/bin/python tests/make_llmfoundry_fixtures.py

llm-foundry runs `rope_impl: dail` and `use_pad_tok_in_ffn: false` only with flash-attn installed, which
needs CUDA. On CPU this script gives it flash-attn's own Python modules instead, read from a flash-attention
git checkout (FLASH_ATTN_REPO, tag FLASH_ATTN_TAG): `bert_padding.py` (pure PyTorch) and `layers/rotary.py`
(its RotaryEmbedding: the cos/sin tables, XPos scaling, `pos_idx_in_fp32`), whose CUDA rotation kernel is
replaced by that file's own PyTorch reference `apply_rotary_emb_torch` (what flash-attn tests the kernel
against). Without FLASH_ATTN_REPO those cases are skipped.

Each case is llm-foundry's `MPTForCausalLM` built from a config, its weights moved off their init
(biases and norm weights included, so loading them is tested), saved with `save_pretrained`, plus
`expected.safetensors`: input ids, attention mask and llm-foundry's fp32 logits for them.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "llmfoundry")
TINY = dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=32, vocab_size=64)
CASES = {  # llm-foundry's defaults: no_bias false, alibi false (learned positions), low-precision LayerNorm
    "defaults": {},
    "alibi_no_bias": dict(no_bias=True, attn_config=dict(alibi=True)),
    "rmsnorm_with_biases": dict(norm_type="rmsnorm"),
    "low_precision_rmsnorm": dict(norm_type="low_precision_rmsnorm", attn_config=dict(alibi=True)),
    "attention_bias_only": dict(no_bias=True, attention_bias=True, attn_config=dict(alibi=True)),
    "unfused_gqa_qk_ln": dict(attn_config=dict(fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2,
                                               qk_ln=True, alibi=True)),
    "rope_hf": dict(attn_config=dict(rope=True, rope_impl="hf"), learned_pos_emb=False),
    "glu_silu_layernorm": dict(norm_type="layernorm", ffn_config=dict(ffn_type="mptglu",
                                                                      ffn_act_fn={"name": "silu"})),
    "temperature_tuning": dict(attn_config=dict(alibi=True, attn_temperature_tuning=dict(floor_scale=4,
                                                                                         attn_scale=0.5))),
    # llm-foundry splits a fused Wqkv by d_model, so a wider head_dim runs with unfused q/k/v only
    "head_dim_unfused": dict(head_dim=16, attn_config=dict(fused_qkv=False, alibi=True, qk_ln=True)),
    "head_dim_gqa_rope_hf": dict(head_dim=4, learned_pos_emb=False, attn_config=dict(
        fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2, rope=True, rope_impl="hf")),
    "softcaps_window": dict(no_bias=True, final_logit_softcapping=20.0,
                            attn_config=dict(alibi=True, attn_logit_softcapping=30.0, sliding_window_size=4)),
    # block_overrides: layer kinds expanded from a nested order; a window + nope layer, KV reused across layers
    "block_overrides_rope_hf": dict(n_layers=4, learned_pos_emb=False, attn_config=dict(rope=True, rope_impl="hf"),
                                    block_overrides=dict(order=[dict(name="default"), dict(order=[
                                        dict(name="window_nope"), dict(name="reuse")]), dict(name="reuse")],
                                        overrides=dict(window_nope=dict(attn_config=dict(sliding_window_size=3,
                                                                                         nope=True)),
                                                       reuse=dict(attn_config=dict(reuse_kv_layer_idx=-1))))),
    "block_overrides_unfused_gqa_alibi": dict(n_layers=4, attn_config=dict(
        alibi=True, fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True),
        block_overrides=dict(order=[dict(name="default"), dict(name="reuse_window")], repeat=2, overrides=dict(
            reuse_window=dict(attn_config=dict(reuse_kv_layer_idx=-1, sliding_window_size=2,
                                               attn_temperature_tuning=dict(floor_scale=2, attn_scale=0.5)))))),
    "rope_dail": dict(learned_pos_emb=False, attn_config=dict(rope=True, rope_impl="dail", rope_theta=500)),
    "rope_dail_xpos": dict(learned_pos_emb=False, attn_config=dict(rope=True, rope_impl="dail", rope_dail_config=dict(
        type="xpos", xpos_scale_base=8, pos_idx_in_fp32=False))),
    # dail rotates d_model // n_heads = 8 of each head's 16 features (flash-attn's rotary_dim < headdim)
    "head_dim_dail": dict(head_dim=16, learned_pos_emb=False, attn_config=dict(fused_qkv=False, rope=True)),
    "head_dim_dail_xpos_gqa": dict(head_dim=12, learned_pos_emb=False, attn_config=dict(
        fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2, rope=True,
        rope_dail_config=dict(type="xpos", xpos_scale_base=8))),
    "block_overrides_dail_nope_reuse": dict(n_layers=3, learned_pos_emb=False, attn_config=dict(rope=True),
                                            block_overrides=dict(order=[dict(name="default"), dict(name="nope"),
                                                                        dict(name="reuse")], overrides=dict(
                                                nope=dict(attn_config=dict(nope=True)),
                                                reuse=dict(attn_config=dict(reuse_kv_layer_idx=-2))))),
    # layers 1 and 2 compute their keys and values from layer 0's input (2 -> 1 -> 0), with their own Wk/Wv
    "block_overrides_reuse_kv_x_gqa": dict(n_layers=3, learned_pos_emb=False, attn_config=dict(
        rope=True, rope_impl="hf", fused_qkv=False, attn_type="grouped_query_attention", kv_n_heads=2, qk_ln=True),
        block_overrides=dict(order=[dict(name="default"), dict(name="reuse_x", repeat=2)], overrides=dict(
            reuse_x=dict(attn_config=dict(reuse_kv_x_layer_idx=-1))))),
    "no_pad_tok_in_ffn": dict(use_pad_tok_in_ffn=False, attn_config=dict(alibi=True)),
    # its dropless MoE in plain PyTorch takes every key below (none has a default there)
    "torch_dmoe_mlp": dict(no_bias=True, attn_config=dict(alibi=True), ffn_config=dict(
        ffn_type="torch_dmoe", moe_num_experts=4, moe_top_k=2, mlp_type="mlp", moe_jitter_eps=None,
        moe_normalize_expert_weights=None, uniform_expert_assignment=False)),
    "torch_dmoe_glu_silu": dict(ffn_config=dict(
        ffn_type="torch_dmoe", moe_num_experts=3, moe_top_k=2, mlp_type="glu", moe_jitter_eps=0.1,
        moe_normalize_expert_weights=1, uniform_expert_assignment=False, ffn_act_fn={"name": "silu"},
        ffn_hidden_size=24)),
    # rope_hf_config types: linear; llama3 with theta 100, whose wavelengths (6.3, 20, 63, 200) fall in each of
    # its three bands (kept below 32 / 4, blended, divided by factor above 32 / 1)
    "rope_hf_linear": dict(learned_pos_emb=False, attn_config=dict(rope=True, rope_impl="hf", rope_hf_config=dict(
        type="linear", factor=3.0))),
    "rope_hf_llama3": dict(max_seq_len=64, learned_pos_emb=False, attn_config=dict(
        rope=True, rope_impl="hf", rope_theta=100, rope_hf_config=dict(
            type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))),
}
NEEDS_FLASH_ATTN = {"rope_dail", "rope_dail_xpos", "head_dim_dail", "head_dim_dail_xpos_gqa",
                    "block_overrides_dail_nope_reuse", "no_pad_tok_in_ffn"}
LEFT_PADDED = {"rope_dail", "rope_dail_xpos", "head_dim_dail_xpos_gqa"}  # dail positions count padding too (flash-attn's seqlen_offset)
FLASH_ATTN_REPO, FLASH_ATTN_TAG = os.environ.get("FLASH_ATTN_REPO"), os.environ.get("FLASH_ATTN_TAG", "v2.7.4")
ROTARY_KERNEL = """
def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False,
                 inplace=False, conjugate=False):
    from flash_attn.layers.rotary import apply_rotary_emb_torch
    assert cu_seqlens is None and isinstance(seqlen_offsets, int) and not conjugate
    rows = slice(seqlen_offsets, seqlen_offsets + x.shape[1])
    out = apply_rotary_emb_torch(x, cos[rows], sin[rows], interleaved)
    return x.copy_(out) if inplace else out
"""


def flash_attn_python_modules():
    """A `flash_attn` package of flash-attn's pure-Python modules (see the module docstring), on sys.path."""
    root = tempfile.mkdtemp()
    files = {"__init__.py": f"__version__ = {FLASH_ATTN_TAG.lstrip('v')!r}\n", "layers/__init__.py": "",
             "ops/__init__.py": "", "ops/triton/__init__.py": "", "ops/triton/rotary.py": ROTARY_KERNEL}
    for name in ("bert_padding.py", "layers/rotary.py"):
        files[name] = subprocess.run(["git", "-C", FLASH_ATTN_REPO, "show", f"{FLASH_ATTN_TAG}:flash_attn/{name}"],
                                     check=True, capture_output=True, text=True).stdout
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, "flash_attn", name)), exist_ok=True)
        with open(os.path.join(root, "flash_attn", name), "w") as f:
            f.write(text)
    sys.path.insert(0, root)


def main():
    if FLASH_ATTN_REPO:
        flash_attn_python_modules()
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    for name, over in CASES.items():
        if name in NEEDS_FLASH_ATTN and not FLASH_ATTN_REPO:
            print(name, "skipped: set FLASH_ATTN_REPO to a flash-attention git checkout")
            continue
        torch.manual_seed(0)
        attn = {"attn_impl": "torch", **over.get("attn_config", {})}
        config = MPTConfig(**{**TINY, **over, "attn_config": attn})
        model = MPTForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ids = torch.randint(0, TINY["vocab_size"], (2, 12))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # a right-padded row
        if name in LEFT_PADDED:
            mask[0, :2] = 0
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask.bool()).logits
        folder = os.path.join(OUT, name)
        model.save_pretrained(folder, safe_serialization=True)
        save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous()},
                  os.path.join(folder, "expected.safetensors"))
        with open(os.path.join(folder, "config.json")) as f:
            print(name, sorted(json.load(f))[:6], "...")


if __name__ == "__main__":
    main()
