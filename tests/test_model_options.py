"""Every MPT option runs forward and backward; masking, padding and packing equal the plain runs;
invalid configs raise one error listing every problem; meta init gives the configured statistics."""
import math

import pytest
import torch

from llmfoundry_lite.config import check
from llmfoundry_lite.errors import ConfigError, UserError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM, flops_per_token
from llmfoundry_lite.models.config import MPTSchema
from llmfoundry_lite.models.layers.attention import apply_rope, dail_rope_cos_sin, rope_cos_sin, rope_inv_freq
from llmfoundry_lite.opening import MPTModelSection

V = 64
# hf RoPE counts real tokens of each sequence; dail RoPE counts from the first token (llm-foundry's)
POSITIONS = {"alibi": {}, "rope": {"attn_config": {"alibi": False, "rope": True, "rope_impl": "hf"}},
             "learned": {"attn_config": {"alibi": False}}}


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    attn = {"attn_uses_sequence_id": True, **kw.pop("attn_config", {})}
    base = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=32, attn_config=attn,
                init_config={"name": "baseline_", "init_std": 0.3})
    return MPTForCausalLM(MPTConfig(**{**base, **kw})).eval()


OPTIONS = {
    "gqa": dict(attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "mqa": dict(attn_config={"attn_type": "multiquery_attention"}),
    "unfused_qkv_clip": dict(attn_config={"fused_qkv": False, "clip_qkv": 0.5}),
    "qk_ln": dict(attn_config={"qk_ln": True, "softmax_scale": 0.3}),
    "qk_gn_gqa": dict(attn_config={"qk_gn": True, "attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "rope_linear": dict(attn_config={"alibi": False, "rope": True, "rope_impl": "hf", "rope_theta": 500,
                                     "rope_hf_config": {"type": "linear", "factor": 2.0}}),
    "rope_dynamic": dict(attn_config={"alibi": False, "rope": True, "rope_hf_config": {"type": "dynamic",
                                                                                        "factor": 2.0}}),
    "rope_llama3_gqa": dict(attn_config={"alibi": False, "rope": True, "rope_impl": "hf", "rope_theta": 100,
                                         "attn_type": "grouped_query_attention", "kv_n_heads": 2, "rope_hf_config": {
                                             "type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
    "learned_pos": dict(attn_config={"alibi": False}),
    "no_positions": dict(learned_pos_emb=False, attn_config={"alibi": False}),
    "dropouts": dict(attn_config={"attn_pdrop": 0.1}, resid_pdrop=0.1, emb_pdrop=0.1),
    "biases_layernorm": dict(no_bias=False, norm_type="layernorm"),
    "rmsnorm": dict(norm_type="rmsnorm"),
    "lp_rmsnorm": dict(norm_type="low_precision_rmsnorm"),
    "glu_silu": dict(ffn_config={"ffn_type": "mptglu", "ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 48}),
    "expansion": dict(expansion_ratio=2.5),
    "logit_scale": dict(logit_scale="inv_sqrt_d_model", final_logit_softcapping=5.0),
    "softcap_window": dict(attn_config={"attn_logit_softcapping": 4.0, "sliding_window_size": 3}),
    "untied_embedding_fraction": dict(tie_word_embeddings=False, embedding_fraction=0.5),
    "wide_heads_fused": dict(head_dim=12, attention_bias=True),
    "narrow_heads_gqa_rope": dict(head_dim=4, attn_config={"alibi": False, "rope": True, "rope_impl": "hf",
                                                           "fused_qkv": False, "attn_type": "grouped_query_attention",
                                                           "kv_n_heads": 2, "qk_gn": True}),
    "temperature_tuning": dict(attn_config={"attn_temperature_tuning": {"floor_scale": 3, "attn_scale": 0.7},
                                            "qk_gn": True}),
    # dail rotates d_model // n_heads = 8 of the 16 features of each head (llm-foundry's), the rest pass through
    "wide_heads_dail_fused_gqa": dict(head_dim=16, attn_config={"alibi": False, "rope": True, "qk_gn": True,
                                                                "attn_type": "grouped_query_attention", "kv_n_heads": 2}),
    "rope_dail_fp16_positions": dict(attn_config={"alibi": False, "rope": True, "rope_dail_config": {
        "pos_idx_in_fp32": False}}),
    # layer 1: window 3 without RoPE, layers 2 and 3 reuse layer 1's keys (3 -> 2 -> 1)
    "block_overrides_fused": dict(n_layers=4, attn_config={"alibi": False, "rope": True, "qk_ln": True},
                                  block_overrides={"order": [{"name": "default"}, {"order": [
                                      {"name": "window_nope"}, {"name": "reuse"}]}, {"name": "reuse"}], "overrides": {
                                      "window_nope": {"attn_config": {"sliding_window_size": 3, "nope": True}},
                                      "reuse": {"attn_config": {"reuse_kv_layer_idx": -1}}}}),
    "block_overrides_unfused_gqa": dict(n_layers=4, attn_config={
        "fused_qkv": False, "attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_gn": True},
        block_overrides={"order": [{"name": "default"}, {"name": "reuse"}], "repeat": 2, "overrides": {"reuse": {
            "attn_config": {"reuse_kv_layer_idx": -1, "nope": True,
                            "attn_temperature_tuning": {"floor_scale": 2, "attn_scale": 0.5}}}}}),
    # layer 1's keys read layer 0's input (nope), layer 2 reuses layer 1's keys, layer 3's read layer 0's input (3 -> 1 -> 0)
    "block_overrides_reuse_kv_x": dict(n_layers=4, attn_config={
        "fused_qkv": False, "attn_type": "grouped_query_attention", "kv_n_heads": 2, "qk_ln": True, "clip_qkv": 2.0},
        block_overrides={"order": [{"name": "default"}, {"name": "x1"}, {"name": "kv"}, {"name": "x2"}], "overrides": {
            "x1": {"attn_config": {"reuse_kv_x_layer_idx": -1, "nope": True}},
            "kv": {"attn_config": {"reuse_kv_layer_idx": -1, "sliding_window_size": 3}},
            "x2": {"attn_config": {"reuse_kv_x_layer_idx": -2}}}}),
    "no_pad_tok_in_ffn": dict(use_pad_tok_in_ffn=False),
    "torch_dmoe": dict(ffn_config={"ffn_type": "torch_dmoe", "moe_num_experts": 4, "moe_top_k": 2}),
    "torch_dmoe_glu_jitter": dict(no_bias=False, ffn_config={
        "ffn_type": "torch_dmoe", "moe_num_experts": 3, "moe_top_k": 2, "mlp_type": "glu", "moe_jitter_eps": 0.2,
        "moe_normalize_expert_weights": 2, "ffn_act_fn": {"name": "silu"}, "ffn_hidden_size": 24}),
    "torch_dmoe_top1_no_pad_tok": dict(use_pad_tok_in_ffn=False, ffn_config={"ffn_type": "torch_dmoe",
                                                                              "moe_num_experts": 3}),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_runs_forward_and_backward(name):
    model = tiny(**OPTIONS[name]).train()
    x = torch.randint(0, V, (2, 12))
    out = model(x, labels=x, sequence_id=torch.tensor([[0] * 5 + [1] * 7] * 2))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():  # and a cached decode equals the full recompute
        model.eval()
        full = model(x).logits[:, -1]
        past = model(x[:, :-1], use_cache=True).past_key_values
        step = model(x[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    assert (full - step).abs().max() < 1e-5


def test_block_overrides_build_llmfoundrys_layers():
    model = tiny(**OPTIONS["block_overrides_fused"])
    attn = [block.attn for block in model.transformer.blocks]
    assert [(a.sliding_window, a.nope, a.reuse_kv) for a in attn] == [
        (-1, False, None), (3, True, None), (-1, False, 1), (-1, False, 1)]
    names = set(model.state_dict())
    assert "transformer.blocks.2.attn.Wq.weight" in names and "transformer.blocks.2.attn.q_ln.weight" in names
    assert not any(n.startswith("transformer.blocks.2.attn.") and ("Wqkv" in n or "k_ln" in n) for n in names)
    # a layer that reuses keys gives other logits than one computing its own (the reuse is not a no-op)
    plain = tiny(**{**OPTIONS["block_overrides_fused"], "block_overrides": None})
    plain.load_state_dict(model.state_dict(), strict=False)
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert (model(x).logits - plain(x).logits).abs().max() > 1e-3


def test_reuse_kv_x_layers_compute_their_keys_from_an_earlier_input():
    """llm-foundry's reuse_kv_x_layer_idx: the layer keeps all its weights (Wk/Wv/k_ln too), its keys and values
    read the resolved earlier layer's input normed by its own norm_1; only that input is kept for it."""
    model = tiny(**OPTIONS["block_overrides_reuse_kv_x"])
    blocks = model.transformer.blocks
    assert [(b.attn.reuse_kv_x, b.attn.reuse_kv, b.shares_x) for b in blocks] == [
        (None, None, True), (0, None, False), (None, 1, False), (0, None, False)]
    names = set(model.state_dict())
    assert {f"transformer.blocks.{i}.attn.{w}.weight" for i in (1, 3) for w in ("Wq", "Wk", "Wv", "k_ln")} <= names
    x = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        out = model(x).logits
        # by hand: layer 1's keys from norm_1 of layer 0's input is what the model does
        h = model.transformer.wte(x)
        calls = []
        hook = blocks[1].attn.Wk.register_forward_hook(lambda mod, args, res: calls.append(args[0]))
        model(x)
        hook.remove()
        torch.testing.assert_close(calls[0], blocks[1].norm_1(h))
        plain = tiny(**{**OPTIONS["block_overrides_reuse_kv_x"], "block_overrides": None})
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (out - plain(x).logits).abs().max() > 1e-3  # not a no-op


@pytest.mark.parametrize("overrides, message", [
    ({"order": [{"name": "default"}], "overrides": {}}, "block_overrides: order expands to 1 layers ['default'], but "
                                                        "n_layers is 2"),
    ({"order": [{"name": "w"}, {"name": "x"}], "overrides": {"w": {}}}, "order names 'x', which is not in overrides"),
    ({"order": [{"name": "w", "order": []}] * 2, "overrides": {"w": {}}}, "order[0].name: give exactly one of name"),
    ({"order": [{"name": "default"}] * 2, "overrides": {"default": {}}}, "overrides.default: 'default' names the"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"attn_config": {"reuse_kv_layer_idx": -1}}}},
     "reuse_kv_layer_idx: -1 from layer 0 is before the first layer"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"attn_config": {"reuse_kv_layer_idx": 0}}}},
     "reuse_kv_layer_idx: a negative (relative) layer index"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"attn_config": {"reuse_kv_x_layer_idx": 0}}}},
     "overrides.r.attn_config.reuse_kv_x_layer_idx: a negative (relative) layer index, -1 for the layer before, got 0"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"attn_config": {"reuse_kv_x_layer_idx": -1}}}},
     "reuse_kv_x_layer_idx: -1 from layer 0 is before the first layer"),
    ({"order": [{"name": "default"}, {"name": "r"}], "overrides": {"r": {"attn_config": {
        "reuse_kv_x_layer_idx": -1, "reuse_kv_layer_idx": -1}}}},
     "overrides.r.attn_config: give one of reuse_kv_layer_idx (an earlier layer's keys and values) and "
     "reuse_kv_x_layer_idx (an earlier layer's input), not both"),
    ({"order": [{"name": "default"}, {"name": "r"}], "overrides": {"r": {"attn_config": {"reuse_kv_x_layer_idx": -1}}}},
     "overrides.r.attn_config.reuse_kv_x_layer_idx needs attn_config.fused_qkv: false (this layer's Wq reads"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"attn_config": {"alibi": False}}}},
     "overrides.r.attn_config.alibi: unknown key"),
    ({"order": [{"name": "r"}] * 2, "overrides": {"r": {"ffn_config": {}}}}, "overrides.r.ffn_config: unknown key"),
])
def test_block_overrides_llmfoundry_refuses_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        tiny(attn_config={"alibi": False, "rope": True}, block_overrides=overrides)


def test_nope_layers_need_alibi_or_rope():
    with pytest.raises(ConfigError, match="block_overrides: nope layers need alibi or rope"):
        tiny(attn_config={"alibi": False}, block_overrides={
            "order": [{"name": "n"}, {"name": "default"}], "overrides": {"n": {"attn_config": {"nope": True}}}})


def test_dail_rope_is_flash_attns_rotary_with_xpos():
    """Attention of one layer against a hand-written RoPE (RoFormer rotation, first/second half pairs) with
    XPos scaling (queries times, keys divided by ((2i + 0.4 d) / (1.4 d)) ** ((p - L // 2) / scale_base))."""
    dail = {"type": "xpos", "xpos_scale_base": 4, "pos_idx_in_fp32": True}
    model = tiny(n_layers=1, attn_config={"alibi": False, "rope": True, "rope_theta": 100, "rope_dail_config": dail})
    attn, d, S = model.transformer.blocks[0].attn, 8, 7
    x = torch.randn(1, S, 32)
    q, k, v = (t.view(S, 4, d) for t in attn.Wqkv(x)[0].split(32, dim=-1))

    def rotate(t, sign):
        out = torch.empty_like(t)
        for p in range(S):
            for i in range(d // 2):
                angle = p * 100 ** (-2 * i / d)
                scale = (((2 * i + 0.4 * d) / (1.4 * d)) ** ((p - S // 2) / 4)) ** sign
                a, b = t[p, :, i], t[p, :, i + d // 2]
                out[p, :, i] = (a * math.cos(angle) - b * math.sin(angle)) * scale
                out[p, :, i + d // 2] = (b * math.cos(angle) + a * math.sin(angle)) * scale
        return out
    q, k = rotate(q, 1), rotate(k, -1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    expected = attn.out_proj(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(1, S, 32))
    from llmfoundry_lite.models.layers.attention import AttentionContext
    ctx = AttentionContext(q_len=S, past_len=0, rope=dail_rope_cos_sin(0, S, d, 100, dail, torch.float32, "cpu"))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, ctx), expected, rtol=0, atol=1e-5)


def test_dail_rope_rotates_d_model_over_n_heads_features_of_wider_heads():
    """flash-attn's rotary with rotary_dim < headdim: the first rotary_dim features rotate as a head of that
    size would, the others pass through unchanged; llm-foundry's rotary_dim is d_model // n_heads."""
    dail = {"type": "xpos", "xpos_scale_base": 4, "pos_idx_in_fp32": True}
    (cos, sin), _ = dail_rope_cos_sin(0, 5, 8, 100, dail, torch.float32, "cpu")
    x = torch.randn(2, 3, 5, 12)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[..., :8], apply_rope(x[..., :8], cos, sin), rtol=0, atol=0)
    assert torch.equal(out[..., 8:], x[..., 8:])
    model = tiny(n_layers=1, head_dim=16, attn_config={"alibi": False, "rope": True})
    cos, sin = model.transformer._rope(torch.zeros(1, 5, 32), None, 0)[0]
    assert cos.shape[-1] == 8


def test_dail_rope_refuses_heads_narrower_than_it_rotates():
    with pytest.raises(ConfigError, match=r"head_dim: 4 is narrower than the 8 features \(d_model // n_heads\) "
                                          "that rope_impl 'dail' rotates"):
        tiny(head_dim=4, attn_config={"alibi": False, "rope": True, "rope_impl": "dail"})
    tiny(head_dim=4, attn_config={"alibi": False, "rope": True, "rope_impl": "hf"})  # hf rotates head_dim features


def test_padding_tokens_skip_the_ffn_without_use_pad_tok_in_ffn():
    """Real tokens' logits are the same either way; padding tokens get no FFN output (llm-foundry's unpadding)."""
    ids, mask = torch.randint(0, V, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    skip, use = tiny(use_pad_tok_in_ffn=False), tiny()
    with torch.no_grad():
        a, b = skip(ids, attention_mask=mask).logits, use(ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(a[real], b[real], rtol=0, atol=1e-5)
        assert (a[~real] - b[~real]).abs().min() > 1e-4
        block = skip.transformer.blocks[0]
        h = torch.randn(2, 8, 32)
        from llmfoundry_lite.models.layers.attention import AttentionContext
        out = block._ffn(h, AttentionContext(q_len=8, past_len=0, key_padding_mask=mask.bool()))
        assert out[~real].abs().max() == 0 and torch.equal(out[real], block.ffn(h)[real])
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)  # left-padded batched generation
        assert torch.equal(skip.generate(ids, attention_mask=mask, **kw)[0, 3:],
                           skip.generate(ids[:1, 3:], **kw)[0])


@pytest.mark.parametrize("pos", list(POSITIONS))
def test_sequence_id_masking_equals_separate_runs(pos):
    model = tiny(**POSITIONS[pos])
    a, b = torch.randint(0, V, (1, 5)), torch.randint(0, V, (1, 7))
    packed = torch.cat([a, b], dim=1)
    seq_id = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        out = model(packed, sequence_id=seq_id).logits
        assert (out[:, :5] - model(a).logits).abs().max() < 1e-5
        assert (out[:, 5:] - model(b).logits).abs().max() < 1e-5
        # without attn_uses_sequence_id the packed sequences see each other
        model.config.attn_config["attn_uses_sequence_id"] = False
        assert (model(packed, sequence_id=seq_id).logits[:, 5:] - model(b).logits).abs().max() > 1e-3


@pytest.mark.parametrize("pos", list(POSITIONS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_unpadded(pos, side):
    model = tiny(**POSITIONS[pos])
    short, long = torch.randint(1, V, (1, 6)), torch.randint(1, V, (1, 10))
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short] if side == "left" else [short, pad], 1), long])
    mask = (torch.arange(10) >= 4) if side == "left" else (torch.arange(10) < 6)
    mask = torch.stack([mask, torch.ones(10, dtype=torch.bool)]).long()
    with torch.no_grad():
        out = model(ids, attention_mask=mask).logits
        real = out[0, 4:] if side == "left" else out[0, :6]
        assert (real - model(short).logits[0]).abs().max() < 1e-5
        assert (out[1] - model(long).logits[0]).abs().max() < 1e-5
        if side == "left":  # batched greedy generation with left padding == each prompt alone
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            batched = model.generate(ids, attention_mask=mask, **kw)
            assert torch.equal(batched[0, 4:], model.generate(short, **kw)[0])
            assert torch.equal(batched[1], model.generate(long, **kw)[0])


@pytest.mark.parametrize("norm_type", ["low_precision_layernorm", "low_precision_rmsnorm", "layernorm"])
def test_bf16_autocast_runs_and_low_precision_norms_stay_in_bf16(norm_type):
    model = tiny(norm_type=norm_type, no_bias=False)
    x = torch.randint(0, V, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        normed = model.transformer.blocks[0].norm_1(model.transformer.wte(x))
        loss = model(x, labels=x).loss
    # llm-foundry's low-precision LayerNorm returns bf16; its RMS norm computes in bf16 but returns the input's dtype
    assert normed.dtype == (torch.bfloat16 if norm_type == "low_precision_layernorm" else torch.float32)
    if norm_type == "low_precision_rmsnorm":  # ... rounded as bf16 math rounds it
        norm = model.transformer.blocks[0].norm_1
        h = model.transformer.wte(x).bfloat16()
        rms = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight.bfloat16()
        assert torch.equal(normed, rms.float())
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():  # outside autocast the low-precision norms equal the plain ones
        h = torch.randn(3, 32)
        plain = torch.nn.functional.layer_norm(h, (32,), model.transformer.norm_f.weight,
                                               model.transformer.norm_f.bias, 1e-5)
        if "layernorm" in norm_type:
            assert torch.allclose(model.transformer.norm_f(h), plain, atol=1e-6)


def test_rope_rotation_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0, max_position_embeddings=32)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    pos = torch.arange(9).expand(2, 9)
    cos, sin = LlamaRotaryEmbedding(cfg)(q, pos)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_cos, ours_sin = rope_cos_sin(pos, 16, 500.0, {}, 32, torch.float32)
    assert torch.allclose(apply_rope(q, ours_cos, ours_sin), ref_q, atol=1e-6)
    assert torch.allclose(apply_rope(k, ours_cos, ours_sin), ref_k, atol=1e-6)


def test_rope_hf_scaling_has_llmfoundrys_frequencies():
    """dynamic past max_seq_len: llm-foundry 0.22's LlamaRotaryEmbedding inv_freq (head size 8, theta 1e4,
    max_seq_len 32, factor 2) after positions 0..39; llama3 keeps, blends or divides each frequency by its
    wavelength (the fixture rope_hf_llama3 pins its logits)."""
    dynamic = {"type": "dynamic", "factor": 2.0}
    assert torch.equal(rope_inv_freq(8, 10000.0, dynamic, 32, 40), torch.tensor(
        [1.0, 0.08735804259777069, 0.007631427608430386, 0.000666666601318866]))
    plain = rope_inv_freq(8, 10000.0, {}, 32, 40)
    assert torch.equal(rope_inv_freq(8, 10000.0, dynamic, 32, 32), plain)  # not longer than max_seq_len
    assert torch.equal(rope_inv_freq(8, 10000.0, {"type": "linear", "factor": 2.0}, 32, 40), plain / 2)
    llama3 = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    base, scaled = rope_inv_freq(8, 100.0, {}, 64, 12), rope_inv_freq(8, 100.0, llama3, 64, 12)
    assert scaled[0] == base[0] and torch.equal(scaled[2:], base[2:] / 4) and base[1] / 4 < scaled[1] < base[1]


LLAMA3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope_hf_config, messages", [
    ({"type": "llama3", "factor": 8.0}, [f"rope_hf_config.{k}: missing required key for type 'llama3'" for k in (
        "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")]),
    ({**LLAMA3, "high_freq_factor": 1.0}, ["rope_hf_config.high_freq_factor: must be greater than low_freq_factor "
                                           "(1.0), got 1.0"]),
    ({"type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, [
        "rope_hf_config.low_freq_factor: type 'linear' does not read it (only llama3 does); remove it"]),
    ({"type": "yarn", "factor": 4.0}, ["rope_hf_config.type: 'yarn' is a transformers rope_type that llm-foundry's "
                                       "MPTConfig refuses (it accepts no_scaling, linear, dynamic, llama3)"]),
    ({"type": "default"}, ["rope_hf_config.type: write 'no_scaling', llm-foundry's name for transformers' 'default'"]),
    ({"type": "linar", "factor": 0}, ["rope_hf_config.type: 'linar' is not allowed; expected one of ['no_scaling', "
                                      "'linear', 'dynamic', 'llama3'] (did you mean 'linear'?)",
                                      "rope_hf_config.factor: must be positive, got 0.0"]),
    ({"type": "dynamic", "beta_fast": 32.0}, ["rope_hf_config.beta_fast: unknown key: a key of transformers' yarn"]),
])
def test_rope_hf_config_checks_the_keys_of_its_type(rope_hf_config, messages):
    with pytest.raises(ConfigError) as e:
        MPTConfig(attn_config={"alibi": False, "rope": True, "rope_impl": "hf", "rope_hf_config": rope_hf_config})
    for message in messages:
        assert f"model.attn_config.{message}" in str(e.value), str(e.value)


def test_rope_hf_config_is_stored_with_its_types_keys():
    """Unset keys are not stored: llm-foundry hands every key to transformers (a null one would break it)."""
    assert MPTConfig().attn_config["rope_hf_config"] == {"type": "no_scaling", "factor": 1.0}
    stored = MPTConfig(attn_config={"alibi": False, "rope": True, "rope_hf_config": LLAMA3}).attn_config
    assert stored["rope_hf_config"] == LLAMA3


def test_invalid_configs_list_every_problem_with_paths():
    with pytest.raises(ConfigError) as e:
        MPTConfig(d_model=30, n_heads=4, attn_config={"attn_type": "grouped_query_attention", "kv_n_heads": 3,
                                                      "rope": True, "alibi_bias_mx": 4, "attn_impl": "trch"},
                  ffn_config={"ffn_typ": "mptmlp"}, init_config={"name": "kaiming"}, n_layer=2)
    text = str(e.value)
    for expected in ["model.d_model: d_model (30) must be divisible by n_heads (4)",
                     "model.attn_config.kv_n_heads: kv_n_heads (3) must divide n_heads (4)",
                     "model.attn_config.rope: alibi and rope are both on",
                     "model.attn_config.alibi_bias_mx: unknown key (did you mean 'alibi_bias_max'?)",
                     "model.ffn_config.ffn_typ: unknown key (did you mean 'ffn_type'?)",
                     "model.n_layer: unknown key (did you mean 'n_layers'?)"]:
        assert expected in text, text
    _, problems = check(MPTSchema, {"attn_config": {"attn_impl": "trch"}, "init_config": {"name": "kaiming"}}, "model")
    assert problems == ["model.attn_config.attn_impl: unknown attention implementation 'trch' (did you mean "
                        "'torch'?); choose one of ['flash', 'flex', 'torch'] or register one with a plug-in",
                        "model.init_config.name: unknown init function 'kaiming' (did you mean 'kaiming_normal_'?); "
                        "choose one of ['baseline_', 'default_', 'kaiming_normal_', 'kaiming_uniform_', "
                        "'neox_init_', 'small_init_', 'xavier_normal_', 'xavier_uniform_'] or register one with a "
                        "plug-in"]
    # a `model:` section also takes llm-foundry's builder keys
    assert check(MPTModelSection, {"d_model": 64, "n_heads": 4, "loss_fn": "fused_crossentropy"}, "model")[1] == []
    with pytest.raises(ConfigError, match="logit_scale"):
        MPTConfig(logit_scale="huge")


def test_flash_without_flash_attn_or_cuda_is_a_clear_error():
    model = tiny(attn_config={"attn_impl": "flash"})
    with pytest.raises(UserError, match="attn_impl: torch"):
        model(torch.randint(0, V, (1, 4)))


def test_meta_init_then_param_init_fn_gives_configured_statistics():
    cfg = MPTConfig(d_model=128, n_heads=4, n_layers=3, vocab_size=256, max_seq_len=16, init_device="meta",
                    init_config={"name": "baseline_", "init_std": 0.02, "emb_init_std": 0.5})
    model = MPTForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.apply(model.param_init_fn)
    params = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in params.values())
    std = lambda name: params[name].std().item()
    assert std("transformer.wte.weight") == pytest.approx(0.5, rel=0.05)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert std("transformer.blocks.0.attn.Wqkv.weight") == pytest.approx(0.02, rel=0.05)
    assert std("transformer.blocks.1.attn.out_proj.weight") == pytest.approx(0.02 / math.sqrt(6), rel=0.08)
    assert std("transformer.blocks.2.ffn.down_proj.weight") == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert torch.equal(params["transformer.norm_f.weight"], torch.ones(128))

    # kaiming_normal_ (the default): std = gain / sqrt(fan_in), each of q, k, v separately
    model = MPTForCausalLM(MPTConfig(d_model=128, n_heads=4, n_layers=2, vocab_size=256, max_seq_len=16,
                                     init_config={"init_div_is_residual": False}))
    assert model.transformer.blocks[0].ffn.up_proj.weight.std().item() == pytest.approx(math.sqrt(2 / 128),
                                                                                         rel=0.05)


def test_flops_per_token_counts_matmul_params_and_attention():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=16)
    model = MPTForCausalLM(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(cfg, 16) == 6 * matmul + 12 * 2 * 64 * 16
    blocks = matmul - 64 * cfg.vocab_size  # activation checkpointing reruns the blocks' forward
    assert flops_per_token(cfg, 16, recompute=True) == flops_per_token(cfg, 16) + 2 * blocks + 4 * 2 * 64 * 16


def test_a_registered_attention_impl_is_used_by_name():
    from llmfoundry_lite.models.layers.attention import torch_attention
    from llmfoundry_lite.registry import attention_impls
    calls = []

    def counting_attention(q, k, v, ctx, **kw):
        calls.append(q.shape)
        return torch_attention(q, k, v, ctx, **kw)

    if "counting_test_impl" not in attention_impls:
        attention_impls.register("counting_test_impl", counting_attention)
    plain, custom = tiny(), tiny(attn_config={"attn_impl": "counting_test_impl"})
    custom.load_state_dict(plain.state_dict())
    x = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        assert torch.allclose(custom(x).logits, plain(x).logits)
    assert len(calls) == 2  # once per layer


def _dmoe_reference(ffn, x, top_k, normalize_p=None):
    """Each token alone: softmax router, its top_k experts, their outputs summed by the (normalised) weights."""
    mlp, size = ffn.experts.mlp, ffn.experts.mlp.hidden_size
    out = torch.zeros_like(x)
    for t, token in enumerate(x):
        weights, experts = ffn.router.layer(token).softmax(-1).topk(top_k)
        if normalize_p:
            weights = weights / weights.norm(p=normalize_p)
        for w, e in zip(weights, experts.tolist(), strict=True):
            rows = slice(e * size, (e + 1) * size)
            h = torch.nn.functional.silu(token @ mlp.w1[rows].T) * (token @ mlp.v1[rows].T)
            out[t] += w * (h @ mlp.w2[rows])
    return out


def test_torch_dmoe_routes_each_token_to_its_top_k_experts():
    model = tiny(**OPTIONS["torch_dmoe_glu_jitter"])
    ffn, x = model.transformer.blocks[0].ffn, torch.randn(2, 7, 32)
    with torch.no_grad():
        out = ffn(x)
        torch.testing.assert_close(out.flatten(0, 1), _dmoe_reference(ffn, x.flatten(0, 1), 2, 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(ffn(x[1:, 2:5]), out[1:, 2:5], rtol=0, atol=1e-5)  # dropless: batch-independent
        assert not torch.equal(ffn.train()(x), ffn(x))  # router jitter while training only
        assert torch.equal(ffn.eval()(x), out)
        # uniform_expert_assignment (llm-foundry's benchmarking mode): slot i of the flattened batch -> expert i mod n
        ffn.uniform, flat = True, x.flatten(0, 1)
        weights = ffn.router.layer(flat).softmax(-1).topk(2).values
        weights = weights / weights.norm(p=2, dim=-1, keepdim=True)
        expected = torch.stack([sum(w * ffn.experts.mlp(token[None], e)[0] for w, e in zip(
            weights[t], (2 * t % 3, (2 * t + 1) % 3), strict=True)) for t, token in enumerate(flat)])
        torch.testing.assert_close(ffn(x).flatten(0, 1), expected, rtol=0, atol=1e-5)
    assert not any("bias" in n for n, _ in ffn.named_parameters())  # llm-foundry's torch_dmoe has none


def test_torch_dmoe_init_flops_and_refusals():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=100, max_seq_len=16, ffn_config={
        "ffn_type": "torch_dmoe", "moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 64})
    model = MPTForCausalLM(cfg)
    mlp = model.transformer.blocks[1].ffn.experts.mlp
    # kaiming_normal_ on each stacked (experts * hidden, d_model) matrix, w2 not divided (as llm-foundry inits it)
    for w in (mlp.w1, mlp.w2):
        assert w.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.05)
    default = MPTForCausalLM(MPTConfig(**{**cfg.to_dict(), "init_config": {"name": "default_"}}))
    assert default.transformer.blocks[0].ffn.experts.mlp.w2.abs().max() <= 1 / math.sqrt(64)
    attention, ffn_active = 4 * 64 * 64, 64 * 8 + 2 * (2 * 64 * 64)  # the router and two experts per token
    assert flops_per_token(cfg, 16) == 6 * (2 * (attention + ffn_active) + 64 * 100) + 12 * 2 * 64 * 16
    with pytest.raises(ConfigError) as e:
        MPTConfig(ffn_config={"ffn_type": "mptglu", "moe_num_experts": 4, "moe_world_size": 2})
    assert "ffn_config.moe_num_experts: a mixture-of-experts key, taken by ffn_type torch_dmoe only" in str(e.value)
    assert "ffn_config.moe_world_size: a MegaBlocks key" in str(e.value)
    with pytest.raises(ConfigError, match="moe_top_k: 3 experts per token, but moe_num_experts is 2"):
        MPTConfig(ffn_config={"ffn_type": "torch_dmoe", "moe_num_experts": 2, "moe_top_k": 3})
    # every torch_dmoe key is written out (llm-foundry needs each), none for the other FFNs
    assert MPTConfig(ffn_config={"ffn_type": "torch_dmoe"}).ffn_config["uniform_expert_assignment"] is False
    assert "moe_top_k" not in MPTConfig().ffn_config
