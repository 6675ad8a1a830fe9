"""The CUDA fast paths against the reference path on the same weights: flash-attn (ALiBi slopes,
padding and packed sequences through the varlen kernel), compiled FlexAttention, the fused linear
cross-entropy under bf16 autocast, and per-block torch.compile. Skipped cleanly without CUDA (and the
flash tests without flash-attn); run them with `pytest -m gpu` on a GPU machine."""
import pytest
import torch

from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
V = 512


def models(impl, **kw):
    """(reference `torch` model, the same weights with attn_impl=impl), on CUDA."""
    attn = {"attn_uses_sequence_id": True, **kw.pop("attn_config", {})}
    cfg = dict(d_model=256, n_heads=8, n_layers=2, vocab_size=V, max_seq_len=256, **kw)
    torch.manual_seed(0)
    ref = MPTForCausalLM(MPTConfig(**cfg, attn_config={**attn, "attn_impl": "torch"})).cuda()
    fast = MPTForCausalLM(MPTConfig(**cfg, attn_config={**attn, "attn_impl": impl})).cuda()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, V, (4, 128), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :40] = 0
    seq = torch.zeros_like(ids)
    seq[1, 50:] = 1
    seq[2, 100:] = 1
    return ids, mask, seq


def compare(ref, fast, tol=3e-2):
    ids, mask, seq = inputs()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for kw in ({"attention_mask": mask}, {"sequence_id": seq}, {}):
            a, b = ref(ids, **kw).logits.float(), fast(ids, **kw).logits.float()
            real = kw.get("attention_mask", torch.ones_like(ids)).bool()
            assert (a[real] - b[real]).abs().max() < tol, kw


@pytest.mark.parametrize("attn_config", [{}, {"attn_type": "grouped_query_attention", "kv_n_heads": 2},
                                         {"sliding_window_size": 32}])
def test_flash_attention_equals_torch(attn_config):
    pytest.importorskip("flash_attn")
    compare(*models("flash", attn_config=attn_config))


@pytest.mark.parametrize("attn_config", [{}, {"attn_type": "grouped_query_attention", "kv_n_heads": 2},
                                         {"alibi": False, "rope": True}])
def test_compiled_flex_attention_equals_torch(attn_config):
    compare(*models("flex", attn_config=attn_config))


def test_fused_cross_entropy_under_bf16_autocast():
    ref, fused = models("torch")
    fused.fused_loss = True
    ids, _, _ = inputs()
    losses, grads = [], []
    for model in (ref.train(), fused.train()):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        grads.append(model.transformer.wte.weight.grad.float())
    assert abs(losses[0] - losses[1]) < 1e-2 * losses[0]
    assert (grads[0] - grads[1]).norm() < 2e-2 * grads[0].norm()


def test_compiled_blocks_equal_eager():
    from llmfoundry_lite.train.parallel import compile_blocks
    ref, compiled = models("torch")
    compile_blocks(compiled, {})
    compare(ref, compiled, tol=2e-2)
