"""Writes tests/fixtures/llmfoundry/<case>/: tiny MPT models saved by llm-foundry itself, with its logits.

Run it with llm-foundry installed in a throwaway venv (it is never a dependency of this project; the
tests only read what this writes):

    python3 -m venv /tmp/lf && /tmp/lf/bin/pip install "llm-foundry==0.22.*"
    /tmp/lf/bin/python tests/make_llmfoundry_fixtures.py

Each case is llm-foundry's `MPTForCausalLM` built from a config, its weights moved off their init
(biases and norm weights included, so loading them is tested), saved with `save_pretrained`, plus
`expected.safetensors`: input ids, attention mask and llm-foundry's fp32 logits for them.
"""
import json
import os

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
}


def main():
    from llmfoundry.models.mpt import MPTConfig, MPTForCausalLM

    for name, over in CASES.items():
        torch.manual_seed(0)
        attn = {"attn_impl": "torch", **over.get("attn_config", {})}
        config = MPTConfig(**TINY, **{**over, "attn_config": attn})
        model = MPTForCausalLM(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        ids = torch.randint(0, TINY["vocab_size"], (2, 12))
        mask = torch.ones_like(ids)
        mask[1, -3:] = 0  # a right-padded row
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
