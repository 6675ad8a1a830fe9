"""The CUDA paths against the reference path on the same weights: flash-attn (ALiBi slopes, padding
and packed sequences through the varlen kernel), compiled FlexAttention (ALiBi, GQA, RoPE, sliding
window, sequence ids), bf16 autocast with low-precision LayerNorm, the fused linear cross-entropy
under bf16, per-block torch.compile, KV-cache decoding, FSDP2 with meta init and activation
checkpointing on one device, and a short bf16 training run through `train()` whose loss falls.
Skipped cleanly without CUDA (and the flash tests without flash-attn); `make gpu-check` runs them."""
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
                                         {"alibi": False, "rope": True}, {"sliding_window_size": 32}])
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
    from llmfoundry_lite.assembly.sharding import compile_blocks
    ref, compiled = models("torch")
    compile_blocks(compiled, {})
    compare(ref, compiled, tol=2e-2)


def test_low_precision_layernorm_under_bf16_autocast():
    """MPT's default norm normalises in bf16 under autocast (plain LayerNorm is upcast to fp32 by
    autocast); both stay close to the fp32 model."""
    ref, _ = models("torch")
    low, _ = models("torch", norm_type="layernorm")
    low.load_state_dict(ref.state_dict())
    ids, _, _ = inputs()
    norm = ref.transformer.blocks[0].norm_1
    with torch.no_grad():
        fp32 = ref(ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert norm(torch.randn(2, 256, device="cuda")).dtype == torch.bfloat16
            a, b = ref(ids).logits.float(), low(ids).logits.float()
    assert (a - fp32).abs().max() < 0.1 and (b - fp32).abs().max() < 0.1


@pytest.mark.parametrize("impl", ["torch", "flex"])
def test_kv_cache_decode_equals_recompute(impl):
    _, model = models(impl)
    prompt = torch.randint(1, V, (2, 9), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        recomputed = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, recomputed)


def test_fsdp2_meta_init_and_activation_checkpointing_on_one_device():
    """A meta-built model, sharded with fully_shard (world of one) and materialised on CUDA by
    `materialize_meta`, with activation checkpointing per block, trains exactly like an unsharded
    copy of the same weights without checkpointing."""
    import torch.distributed as dist
    from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from llmfoundry_lite.assembly.sharding import materialize_meta
    from llmfoundry_lite.models.mpt import MPTBlock
    dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29517", world_size=1, rank=0)
    try:
        cfg = MPTConfig(d_model=128, n_heads=4, n_layers=2, vocab_size=V, max_seq_len=64, init_device="meta")
        torch.manual_seed(0)
        sharded = MPTForCausalLM(cfg)
        assert all(p.is_meta for p in sharded.parameters())
        for block in sharded.transformer.blocks:
            fully_shard(block)
        fully_shard(sharded)
        materialize_meta(sharded, "cuda")
        plain = MPTForCausalLM(MPTConfig(**{**cfg.to_dict(), "init_device": "cpu"})).cuda()
        plain.load_state_dict({k: v.full_tensor() for k, v in sharded.state_dict().items()})
        apply_activation_checkpointing(sharded, check_fn=lambda m: isinstance(m, MPTBlock))
        ids = torch.randint(1, V, (4, 64), device="cuda")
        losses = []
        for model in (sharded, plain):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            run = []
            for _ in range(3):
                loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
                run.append(loss.item())
            losses.append(run)
        assert losses[0][-1] < losses[0][0]
        assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-4
    finally:
        dist.destroy_process_group()


def test_short_bf16_training_run_loss_falls(tmp_path, tiny_tokenizer_dir):
    """`train()` on CUDA with amp_bf16, compiled blocks and compiled flex attention: the loss falls."""
    from llmfoundry_lite import train

    from train_utils import read_losses, tiny_overrides, write_copy_task
    data = write_copy_task(str(tmp_path / "data"))
    log = tmp_path / "log.jsonl"
    train(TINY_YAML, tiny_overrides(data, tiny_tokenizer_dir, **{
        "precision": "amp_bf16", "max_duration": "40ba", "model.attn_config.attn_impl": "flex",
        "compile_config": "{}", "optimizer.lr": "6e-3", "loggers.jsonl.path": str(log)}))
    losses = [loss for _, loss in read_losses(str(log))]
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


TINY_YAML = __file__.rsplit("/", 2)[0] + "/yamls/pretrain/mpt-tiny-cpu.yaml"
