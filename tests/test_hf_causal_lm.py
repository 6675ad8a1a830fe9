"""`model.name: hf_causal_lm` as llm-foundry defines it (the one way to start from an HF folder), and
`init_device` for both model names, in one process (tests/test_init_device_multiprocess.py has
`init_device: mixed` and `meta` on 2 ranks)."""
import pytest
import torch

from llmfoundry_lite import registry
from llmfoundry_lite.assembly.sharding import materialize_meta
from llmfoundry_lite.config import Named, parse
from llmfoundry_lite.errors import CheckpointError, ConfigError
from llmfoundry_lite.export.hf_import import load_hf_config
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

TINY = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=96, attn_config={"qk_ln": True})


class Tokenizer:  # a model section only asks the tokenizer for its size
    def __len__(self):
        return 90


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny MPT saved in several safetensors shards with an index (read lazily by a meta build)."""
    path = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    MPTForCausalLM(MPTConfig(**TINY)).save_pretrained(path, max_shard_size="20KB")
    return str(path)


def build(section):
    return parse(Named[registry.models], section, "model").build(Tokenizer())


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_loads_the_folder_and_config_overrides_merge_onto_its_config(folder):
    model = build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "use_auth_token": False,
                   "trust_remote_code": True, "config_overrides": {
                       "max_seq_len": 64, "attn_config": {"attn_impl": "flex", "clip_qkv": 4.0}}})
    assert model.config.max_seq_len == 64
    attn = model.config.attn_config  # merged: the folder's qk_ln is kept beside the two overrides
    assert (attn["attn_impl"], attn["clip_qkv"], attn["qk_ln"], attn["alibi"]) == ("flex", 4.0, True, True)
    assert same_weights(model, MPTForCausalLM.from_pretrained(folder))


def test_pretrained_false_is_a_fresh_init_of_the_folders_config(folder):
    torch.manual_seed(1)
    model = build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "pretrained": False})
    torch.manual_seed(1)
    fresh = MPTForCausalLM(load_hf_config(folder)[1])
    assert same_weights(model, fresh)
    saved = MPTForCausalLM.from_pretrained(folder).state_dict()
    assert not any(torch.equal(saved[k], v) for k, v in model.state_dict().items() if v.dim() > 1)  # matrices


def test_meta_and_mixed_init_with_a_pretrained_folder_equal_a_cpu_load(folder):
    """init_device meta: built empty, the weights read tensor by tensor when materialised (in one
    process by prepare_model, under FSDP2 per shard); mixed in one process is rank 0: a cpu load."""
    cpu = MPTForCausalLM.from_pretrained(folder)
    meta = build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "init_device": "meta"})
    assert all(p.is_meta for p in meta.parameters())
    materialize_meta(meta)
    assert same_weights(meta, cpu) and meta.lm_head.weight is meta.transformer.wte.weight
    mixed = build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "init_device": "mixed"})
    assert same_weights(mixed, cpu)


def test_mpt_causal_lm_builds_fresh_on_any_init_device(monkeypatch):
    """meta and mixed (rank 0: cpu; another rank: meta, its weights FSDP's broadcast of rank 0's) also
    apply to a model built from config keys."""
    section = {"name": "mpt_causal_lm", **TINY}
    torch.manual_seed(2)
    cpu = build(section)
    torch.manual_seed(2)
    assert same_weights(build({**section, "init_device": "mixed"}), cpu)
    monkeypatch.setenv("RANK", "1")
    assert all(p.is_meta for p in build({**section, "init_device": "mixed"}).parameters())
    meta = build({**section, "init_device": "meta"})
    assert all(p.is_meta for p in meta.parameters())


@pytest.mark.parametrize("key", ["pretrained_model_name_or_path", "pretrained"])
def test_mpt_causal_lm_refuses_a_folder_and_names_the_way_to_start_from_one(folder, key):
    with pytest.raises(ConfigError) as e:
        parse(Named[registry.models], {"name": "mpt_causal_lm", key: folder if key != "pretrained" else True,
                                       "max_seq_len": 64}, "model")
    assert e.value.problems == [
        f"model.{key}: unknown key: mpt_causal_lm builds a model from config keys; to start from a folder use "
        "name: hf_causal_lm with pretrained_model_name_or_path, and put the MPT keys to change under "
        "config_overrides"]


def test_meta_init_refuses_weights_that_do_not_match_before_building(folder):
    with pytest.raises(CheckpointError, match=r"size mismatch \['transformer.blocks.0.attn.Wqkv.weight"):
        build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "init_device": "meta",
               "config_overrides": {"d_model": 64}})


def test_bad_overrides_and_keys_are_named_with_the_fix(folder):
    with pytest.raises(ConfigError) as e:
        parse(Named[registry.models], {"name": "hf_causal_lm", "pretrained_model_name_or_path": folder,
                                       "init_device": "gpu", "load_in_4bit": True, "config_overrides": {
                                           "max_seqlen": 64, "attn_config": {"attn_imp": "flash"}}}, "model")
    problems = e.value.problems
    assert any(p.startswith("model.config_overrides.max_seqlen: unknown key (did you mean 'max_seq_len'?)")
               for p in problems), problems
    assert any(p.startswith("model.config_overrides.attn_config.attn_imp: unknown key (did you mean 'attn_impl'?)")
               for p in problems), problems
    assert any(p.startswith("model.init_device: not a torch device: 'gpu'") for p in problems), problems
    assert any(p.startswith("model.load_in_4bit: unknown key") for p in problems), problems
    assert len(problems) == 4


def test_use_flash_attention_2_selects_the_flash_kernel(folder):
    model = build({"name": "hf_causal_lm", "pretrained_model_name_or_path": folder, "use_flash_attention_2": True})
    assert model.config.attn_config["attn_impl"] == "flash"


def test_a_hub_name_that_is_no_local_folder_gives_the_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot find model 'someone/mpt-none': not a local folder"):
        build({"name": "hf_causal_lm", "pretrained_model_name_or_path": "someone/mpt-none", "token": "hf_x",
               "use_auth_token": True})
