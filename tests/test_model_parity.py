"""MPTForCausalLM and the task heads against transformers' Mpt implementation on the same weights."""
import pytest
import torch
import transformers

from llmfoundry_lite.errors import UserError
from llmfoundry_lite.models import (
    MPTConfig,
    MPTForCausalLM,
    MPTForQuestionAnswering,
    MPTForSequenceClassification,
    MPTForTokenClassification,
)
from llmfoundry_lite.models.layers.attention import alibi_slopes

V = 97


def hf_pair(n_heads, d_model, n_layers=2, hf_cls=transformers.MptForCausalLM, ours_cls=MPTForCausalLM,
            max_seq_len=48, seed=0, **extra):
    torch.manual_seed(seed)
    hc = transformers.MptConfig(d_model=d_model, n_heads=n_heads, n_layers=n_layers, vocab_size=V,
                                max_seq_len=max_seq_len, **extra)
    hf = hf_cls(hc).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
    ours = ours_cls(MPTConfig(**hc.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


@pytest.mark.parametrize("n_heads,d_model,batch,seq", [(3, 24, 2, 17), (6, 48, 3, 33), (4, 32, 1, 48),
                                                       (5, 40, 2, 9)])
def test_causal_lm_logits_and_loss_match_transformers(n_heads, d_model, batch, seq):
    hf, ours = hf_pair(n_heads, d_model)
    x = torch.randint(0, V, (batch, seq))
    labels = x.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        a, b = hf(x, labels=labels), ours(x, labels=labels)
    assert (a.logits - b.logits).abs().max() < 1e-5
    assert torch.allclose(a.loss, b.loss, atol=1e-6)


@pytest.mark.parametrize("alibi_bias_max", [8, 5])
def test_alibi_slopes_equal_mpt_definition_for_any_head_count(alibi_bias_max):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    for n_heads in range(1, 13):
        ref = build_mpt_alibi_tensor(n_heads, 2, alibi_bias_max)[:, 0, 0]  # bias of the key one step back
        assert torch.allclose(-alibi_slopes(n_heads, alibi_bias_max), ref, rtol=0, atol=0), n_heads


def test_loss_and_its_gradient_equal_torch_cross_entropy():
    from llmfoundry_lite.models.mpt import CrossEntropy
    logits = torch.randn(20, 11, requires_grad=True)
    targets = torch.randint(0, 11, (20,))
    targets[::3] = -100
    ref_logits = logits.detach().clone().requires_grad_()
    ours, ref = CrossEntropy.apply(logits, targets), torch.nn.functional.cross_entropy(ref_logits, targets)
    (ours * 3).backward()
    (ref * 3).backward()
    assert torch.allclose(ours, ref, atol=1e-6) and torch.allclose(logits.grad, ref_logits.grad, atol=1e-6)
    assert CrossEntropy.apply(logits, torch.full((20,), -100)).item() == 0.0  # nothing to learn: 0, not NaN


def test_task_heads_match_transformers():
    x = torch.randint(1, V, (3, 12))
    x[0, -4:] = 0  # right padding with pad id 0
    x[1, :2] = 0   # left padding
    hf, ours = hf_pair(3, 24, hf_cls=transformers.MptForSequenceClassification,
                       ours_cls=MPTForSequenceClassification, num_labels=4, pad_token_id=0)
    labels = torch.tensor([0, 3, 1])
    with torch.no_grad():
        a, b = hf(x, labels=labels), ours(x, labels=labels)
    assert (a.logits - b.logits).abs().max() < 1e-5 and torch.allclose(a.loss, b.loss, atol=1e-6)
    multi = torch.rand(3, 4).round()
    with torch.no_grad():  # float labels: multi-label BCE in both (problem_type set per model)
        hf.config.problem_type = ours.config.problem_type = None
        assert torch.allclose(hf(x, labels=multi).loss, ours(x, labels=multi).loss, atol=1e-6)

    hf, ours = hf_pair(6, 48, hf_cls=transformers.MptForTokenClassification, ours_cls=MPTForTokenClassification,
                       num_labels=5)
    tags = torch.randint(0, 5, (3, 12))
    with torch.no_grad():
        a, b = hf(x, labels=tags), ours(x, labels=tags)
    assert (a.logits - b.logits).abs().max() < 1e-5 and torch.allclose(a.loss, b.loss, atol=1e-6)

    hf, ours = hf_pair(4, 32, hf_cls=transformers.MptForQuestionAnswering, ours_cls=MPTForQuestionAnswering)
    start, end = torch.tensor([1, 5, 40]), torch.tensor([3, 7, 11])  # 40 is outside: ignored by both
    with torch.no_grad():
        a, b = hf(x, start_positions=start, end_positions=end), ours(x, start_positions=start, end_positions=end)
    assert (a.start_logits - b.start_logits).abs().max() < 1e-5
    assert (a.end_logits - b.end_logits).abs().max() < 1e-5
    assert torch.allclose(a.loss, b.loss, atol=1e-6)


def test_hf_folders_load_both_ways(tmp_path):
    hf, _ = hf_pair(3, 24)
    hf.save_pretrained(tmp_path / "hf")
    ours = MPTForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max() < 1e-5
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert isinstance(back, transformers.MptForCausalLM)
    with torch.no_grad():
        assert torch.equal(back(x).logits, hf(x).logits)


def test_generation_cache_equals_recompute_and_transformers():
    hf, ours = hf_pair(6, 48)
    prompt = torch.randint(0, V, (2, 5))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    cached = ours.generate(prompt, use_cache=True, **kw)
    recomputed = ours.generate(prompt, use_cache=False, **kw)
    assert cached.shape == (2, 17)
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached, hf.generate(prompt, **kw))


def test_max_seq_len_can_be_raised_at_load_and_is_enforced(tmp_path):
    hf, ours = hf_pair(4, 32, max_seq_len=16)
    ours.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"longer than max_seq_len \(16\)"):
        ours(torch.randint(0, V, (1, 17)))
    config = MPTConfig.from_pretrained(tmp_path)
    config.max_seq_len = 40  # what the MPT-7B StoryWriter card does for ALiBi extrapolation
    longer = MPTForCausalLM.from_pretrained(tmp_path, config=config).eval()
    x = torch.randint(0, V, (1, 40))
    with torch.no_grad():
        out = longer(x).logits
    assert torch.isfinite(out).all()
    with torch.no_grad():  # the first 16 positions are unchanged by the longer context (causal)
        assert (out[:, :16] - ours(x[:, :16]).logits).abs().max() < 1e-5
