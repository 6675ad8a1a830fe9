"""Every fast path equals the reference path, on CPU where it runs there: FlexAttention vs SDPA (every
mask and position option, KV-cache decoding), the fused linear cross-entropy vs the plain one (loss and
gradients), and per-block `torch.compile` and the fused loss vs the eager run through `train()`.
The CUDA-only paths (flash-attn, compiled FlexAttention, bf16) are in test_gpu.py."""
import shutil

import pytest
import torch

from llmfoundry_lite.errors import UserError
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
from llmfoundry_lite.models.mpt import CrossEntropy, FusedLinearCrossEntropy


def _flex_trains_on_cpu() -> bool:
    """torch 2.7 has an (eager) FlexAttention backward on CPU; later releases refuse it."""
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.zeros(1, 1, 16, 8, requires_grad=True)
    try:
        flex_attention(q, q, q).sum().backward()
        return True
    except NotImplementedError:
        return False


FLEX_TRAINS_ON_CPU = _flex_trains_on_cpu()

pytestmark = pytest.mark.usefixtures("torch_one_thread")
V = 64
CASES = {
    "alibi": {},
    "gqa_alibi": {"attn_config": {"attn_type": "grouped_query_attention", "kv_n_heads": 2}},
    "mqa_rope": {"attn_config": {"attn_type": "multiquery_attention", "alibi": False, "rope": True}},
    "softcap_window": {"attn_config": {"attn_logit_softcapping": 4.0, "sliding_window_size": 3}},
    "learned_pos": {"attn_config": {"alibi": False}},
}


def pair(attn_config=None, **kw):
    """The same weights under attn_impl torch and flex."""
    attn = {"attn_uses_sequence_id": True, **(attn_config or {})}
    cfg = dict(d_model=32, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=32,
               init_config={"name": "baseline_", "init_std": 0.3}, **kw)
    torch.manual_seed(0)
    ref = MPTForCausalLM(MPTConfig(**cfg, attn_config={**attn, "attn_impl": "torch"}))
    flex = MPTForCausalLM(MPTConfig(**cfg, attn_config={**attn, "attn_impl": "flex"}))
    flex.load_state_dict(ref.state_dict())
    return ref, flex


def _grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(CASES))
def test_flex_attention_equals_sdpa(name):
    ref, flex = pair(**CASES[name])
    ids = torch.randint(1, V, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                   # left padding in row 0
    seq = torch.tensor([[0] * 5 + [1] * 7, [0] * 8 + [1] * 4])
    for inputs in ({"input_ids": ids, "attention_mask": mask}, {"input_ids": ids, "sequence_id": seq}):
        labels = ids.clone()
        if "attention_mask" in inputs:  # no loss at padded positions, nor on the first real token (predicted
            labels[0, :4] = -100        # from a padded position, whose output no implementation defines)
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        if not FLEX_TRAINS_ON_CPU:  # the forward still matches; training is refused clearly
            with pytest.raises(UserError, match="use attn_impl: torch"):
                _grads(flex.train(), **inputs, labels=labels)
            with torch.no_grad():
                out_ref, out_flex = ref.train()(**inputs, labels=labels), flex(**inputs, labels=labels)
            assert (out_ref.logits[real] - out_flex.logits[real]).abs().max() < 1e-5
            assert abs(out_ref.loss.item() - out_flex.loss.item()) < 1e-6
            continue
        out_ref, g_ref = _grads(ref.train(), **inputs, labels=labels)
        out_flex, g_flex = _grads(flex.train(), **inputs, labels=labels)
        assert (out_ref.logits[real] - out_flex.logits[real]).abs().max() < 1e-5
        assert abs(out_ref.loss.item() - out_flex.loss.item()) < 1e-6
        assert g_ref.keys() == g_flex.keys()
        assert all((g_ref[k] - g_flex[k]).abs().max() < 1e-5 for k in g_ref), name
    # KV-cache decoding: one new token after a cached prefix
    with torch.no_grad():
        ref.eval(), flex.eval()
        past_ref = ref(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        past_flex = flex(ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True).past_key_values
        step_ref = ref(ids[:, -1:], attention_mask=mask, past_key_values=past_ref, use_cache=True).logits
        step_flex = flex(ids[:, -1:], attention_mask=mask, past_key_values=past_flex, use_cache=True).logits
    assert (step_ref - step_flex).abs().max() < 1e-5


def test_flex_attention_refuses_dropout():
    _, flex = pair(attn_config={"attn_pdrop": 0.1})
    with pytest.raises(UserError, match="'flex' has no attention dropout"):
        flex.train()(torch.randint(0, V, (1, 8)))


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_fused_linear_cross_entropy_equals_plain(scale):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    plain = CrossEntropy.apply((hidden @ weight.T) * scale, targets)
    g_plain = torch.autograd.grad(plain * 3.0, (hidden, weight))
    fused = FusedLinearCrossEntropy.apply(hidden, weight, targets, scale, 8)  # 5 chunks, the last one short
    g_fused = torch.autograd.grad(fused * 3.0, (hidden, weight))
    assert torch.allclose(plain, fused, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g_plain, g_fused, strict=True))
    none = torch.full((37,), -100)
    assert FusedLinearCrossEntropy.apply(hidden, weight, none, scale, 8).item() == 0.0


def test_fused_loss_in_the_model_returns_no_logits_and_the_same_gradients():
    ref, _ = pair(logit_scale=0.5)
    fused = MPTForCausalLM(ref.config)
    fused.load_state_dict(ref.state_dict())
    fused.fused_loss = True
    ids = torch.randint(0, V, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out_ref, g_ref = _grads(ref.train(), input_ids=ids, labels=labels)
    out_fused, g_fused = _grads(fused.train(), input_ids=ids, labels=labels)
    assert out_fused.logits is None and abs(out_ref.loss.item() - out_fused.loss.item()) < 1e-6
    assert all((g_ref[k] - g_fused[k]).abs().max() < 1e-6 for k in g_ref)
    with torch.no_grad():  # evaluation computes logits as usual
        assert fused.eval()(input_ids=ids, labels=labels).logits is not None


@pytest.mark.timeout(600)
def test_compiled_blocks_and_fused_loss_train_like_the_eager_run(tiny_tokenizer_dir, tmp_path):
    from llmfoundry_lite import train

    from train_utils import TINY_YAML, read_losses, tiny_overrides, write_copy_task
    data = write_copy_task(str(tmp_path / "data"), n_train=64, n_val=8)
    losses = {}
    for name, extra in {"eager": {}, "compiled": {"compile_config": "{}"},
                        "fused": {"model.loss_fn": "fused_crossentropy"}}.items():
        local = str(tmp_path / f"data-{name}")
        shutil.copytree(data, local)
        metrics = str(tmp_path / f"{name}.jsonl")
        trainer = train(TINY_YAML, tiny_overrides(local, tiny_tokenizer_dir, **{
            "max_duration": "4ba", "save_folder": "null", "loggers.jsonl.path": metrics, **extra}))
        if name == "compiled":
            assert all(getattr(b, "_compiled_call_impl", None) is not None
                       for b in trainer.state.model.model.transformer.blocks)
        trainer.close()
        losses[name] = [loss for _, loss in read_losses(metrics)]
    assert len(losses["eager"]) == 4 and losses["eager"][-1] < losses["eager"][0]
    for name in ("compiled", "fused"):
        assert max(abs(a - b) for a, b in zip(losses["eager"], losses[name], strict=True)) < 1e-4, (name, losses)
