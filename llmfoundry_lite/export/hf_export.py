"""Writing a Hugging Face folder: config, streamed safetensors shards, tokenizer, generation config.

Parameter names already equal transformers' Mpt names, so the weights are written as they are.
The config decides the folder's kind:
- native (`model_type: mpt`, only `transformers.MptConfig` keys): when stock `MptForCausalLM`
  computes exactly what our model computes. `native_blockers` lists what prevents that, checked
  against what transformers' Mpt code really does (it always applies ALiBi with bias max 8, builds a
  fused MHA `Wqkv`, a 4x exact-GELU MLP and bias-free LayerNorms, and ignores logit_scale). Options
  it does not know, when not at their default, also block: a folder never loads with wrong numerics.
- custom code (`model_type: llmfoundry_mpt`, `auto_map`): our own model source bundled into one
  modeling file and one configuration file (see remote_code.py), for `trust_remote_code=True`.
  The distinct model_type makes loading without trust_remote_code an error, not a stock Mpt model.

The folder's `.llmfoundry_lite.json` lists what the export wrote: a later export replaces those files
(and removes those it does not write again), never a user's; see files.py `staged_folder`.

Tensors are pulled from the state dict one at a time (it may be lazy, see composer_checkpoint.py),
converted and written when a shard is full, so peak memory is about one shard plus one tensor.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, Iterable, List, Mapping, Set, Tuple, Union

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, MptConfig

from llmfoundry_lite.assembly.weights import check_state_dict
from llmfoundry_lite.compat.hf import PRETRAINED_CONFIG_KEYS, STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP, stock_mpt_values
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.remote_code import write_remote_code
from llmfoundry_lite.files import claim_folder, staged_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXACT_GELU = ({"name": "gelu"}, {"name": "gelu", "approximate": "none"})

# Keys that do not change what an eval-mode forward computes (dropout, init, kernels, bookkeeping).
_NEUTRAL = {
    "attn_pdrop", "attn_impl", "attn_uses_sequence_id", "resid_pdrop", "emb_pdrop", "embedding_fraction",
    "init_config", "init_device", "use_cache", "initializer_range", "verbose", "tokenizer_name",
    "use_pad_tok_in_ffn", "fc_type", "tie_word_embeddings", "layer_norm_epsilon", "max_seq_len",
    "vocab_size", "d_model", "n_heads", "n_layers", "clip_qkv", "softmax_scale", "rope_theta",
    "rope_impl", "rope_dail_config", "rope_hf_config", "learned_pos_emb", "flex_attn_mod_list",
    "prefix_lm", "kv_dim", "model_type",
}


def _native_checks(cfg) -> Dict[str, Tuple[bool, str]]:
    """key path -> (stock transformers computes the same, why not)."""
    attn, ffn = cfg.attn_config, cfg.ffn_config
    mha = attn["attn_type"] == "multihead_attention" and attn.get("kv_n_heads") in (None, cfg.n_heads)
    return {
        "attn_config.attn_type": (mha, "stock Mpt has multi-head attention only (no GQA/MQA)"),
        "attn_config.kv_n_heads": (mha, "stock Mpt has multi-head attention only (no GQA/MQA)"),
        "attn_config.alibi": (attn["alibi"], "stock Mpt always applies ALiBi"),
        "attn_config.attn_pdrop": (STOCK_MPT_TAKES_FRACTIONAL_ATTN_PDROP or float(attn["attn_pdrop"]).is_integer(),
                                   "this transformers' MptConfig takes only a whole-number attn_pdrop"),
        "attn_config.rope": (not attn.get("rope"), "stock Mpt has no RoPE"),
        "attn_config.alibi_bias_max": (attn.get("alibi_bias_max", 8) == 8, "stock Mpt uses alibi_bias_max 8"),
        "attn_config.qk_ln": (not attn.get("qk_ln"), "stock Mpt has no qk LayerNorm"),
        "attn_config.qk_gn": (not attn.get("qk_gn"), "stock Mpt has no qk GroupNorm"),
        "attn_config.fused_qkv": (attn.get("fused_qkv", True), "stock Mpt has a fused Wqkv"),
        "attn_config.sliding_window_size": (attn.get("sliding_window_size", -1) == -1,
                                            "stock Mpt has no sliding window"),
        "attn_config.attn_logit_softcapping": (not attn.get("attn_logit_softcapping"),
                                               "stock Mpt has no attention soft-capping"),
        "no_bias": (cfg.no_bias, "stock Mpt has no biases"),
        "attention_bias": (not cfg.attention_bias, "stock Mpt has no biases"),
        "head_dim": (cfg.head_dim == cfg.d_model // cfg.n_heads, "stock Mpt's heads are d_model // n_heads wide"),
        "norm_type": (cfg.norm_type.lower() in ("layernorm", "low_precision_layernorm"),
                      "stock Mpt uses LayerNorm"),
        "ffn_config.ffn_type": (ffn.get("ffn_type", "mptmlp") == "mptmlp", "stock Mpt has a plain MLP (no GLU)"),
        "ffn_config.ffn_act_fn": (ffn.get("ffn_act_fn") in (None, *EXACT_GELU), "stock Mpt uses exact GELU"),
        "ffn_config.ffn_hidden_size": (cfg.ffn_hidden_size == 4 * cfg.d_model,
                                       "stock Mpt's MLP is 4 x d_model wide"),
        "expansion_ratio": (cfg.ffn_hidden_size == 4 * cfg.d_model, "stock Mpt's MLP is 4 x d_model wide"),
        "logit_scale": (cfg.logit_scale in (None, 1, 1.0), "stock Mpt does not scale logits"),
        "final_logit_softcapping": (not getattr(cfg, "final_logit_softcapping", None),
                                    "stock Mpt has no logit soft-capping"),
    }


def native_blockers(config) -> List[str]:
    """'key = value: reason' for every setting stock `transformers.MptForCausalLM` cannot represent."""
    return config_blockers(config, _native_checks(config), _NEUTRAL, "not part of stock transformers' Mpt")


def config_blockers(config, checks: Dict[str, Tuple[bool, str]], neutral: Set[str], unknown: str) -> List[str]:
    """'key = value: reason' for each failed check of a format (key path -> (representable, why not)), then
    for each other key changed from its default, unless a check covers it (the key or a section above it)
    or a part of its path is in `neutral`: `unknown` says why (an option the format does not know)."""
    out = [f"{key} = {_get(config, key)!r}: {why}" for key, (ok, why) in checks.items() if not ok]

    def covered(key: str) -> bool:
        parts = key.split(".")
        return (key in PRETRAINED_CONFIG_KEYS or any(".".join(parts[:i]) in checks for i in range(1, len(parts) + 1))
                or any(part in neutral for part in parts))
    return out + [f"{key} = {value!r}: {unknown}" for key, value in _changed(config.to_dict(), MPTConfig().to_dict())
                  if not covered(key)]


def _get(config, path: str):
    value = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return value


def _changed(values: dict, defaults: dict, prefix: str = ""):
    """(dotted key, value) for every entry that differs from `defaults`, looking inside sub-dicts."""
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            yield from _changed(value, default, f"{prefix}{key}.")
        elif value != default:
            yield f"{prefix}{key}", value


def native_config(config, dtype: torch.dtype, tokenizer=None):
    """The `transformers.MptConfig` (stock keys only) equal to `config`, for a native export."""
    attn = config.attn_config
    ids = _special_token_ids(config, tokenizer)
    return MptConfig(**stock_mpt_values(dict(
        d_model=config.d_model, n_heads=config.n_heads, n_layers=config.n_layers, expansion_ratio=4,
        max_seq_len=config.max_seq_len, vocab_size=config.vocab_size, resid_pdrop=config.resid_pdrop,
        layer_norm_epsilon=config.layer_norm_epsilon, emb_pdrop=config.emb_pdrop, learned_pos_emb=False,
        attn_config=dict(attn_type="multihead_attention", attn_pdrop=attn["attn_pdrop"], attn_impl="torch",
                         clip_qkv=attn["clip_qkv"], softmax_scale=attn["softmax_scale"], prefix_lm=False,
                         qk_ln=False, attn_uses_sequence_id=attn["attn_uses_sequence_id"], alibi=True,
                         alibi_bias_max=8),
        init_device="cpu", logit_scale=None, no_bias=True, embedding_fraction=config.embedding_fraction,
        norm_type=config.norm_type, use_cache=config.use_cache, initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings, architectures=["MptForCausalLM"], torch_dtype=dtype,
        **ids)))


def _special_token_ids(config, tokenizer) -> dict:
    """bos/eos/pad ids: the tokenizer's when given, else the config's."""
    ids = {name: getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {name: getattr(config, name, None) if value is None else value for name, value in ids.items()}


def parse_size(size: Union[int, str]) -> int:
    """'5GB' / '500MB' / '10KiB' / 1000 -> bytes."""
    if isinstance(size, int) or size.strip().isdigit():
        return int(size)
    s = size.strip().upper()
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    for unit, factor in units.items():
        if s.endswith(unit):
            with contextlib.suppress(ValueError, OverflowError):  # OverflowError: 'infGB'
                return int(float(s[: -len(unit)]) * factor)
    raise UserError(f"max_shard_size {size!r}: give a size like 5GB, 500MB or 200MiB")


def write_shards(tensors: Iterable[Tuple[str, torch.Tensor]], out_dir: str, dtype: torch.dtype,
                 max_shard_size: Union[int, str] = "5GB") -> List[str]:
    """Stream (name, tensor) pairs into safetensors shards plus `model.safetensors.index.json`; returns
    the shard file names. Those need the total count, which a stream does not know up front: shards
    are written under temporary names and renamed at the end."""
    limit = parse_size(max_shard_size)
    tmp_names: List[str] = []
    weight_map: Dict[str, int] = {}
    shard: Dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush():
        nonlocal shard, shard_bytes
        name = f".tmp-shard-{len(tmp_names):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        tmp_names.append(name)
        shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        t = tensor.detach().to("cpu", dtype=dtype if tensor.is_floating_point() else tensor.dtype).contiguous()
        size = t.numel() * t.element_size()
        if t.untyped_storage().nbytes() != size:  # safetensors refuses views of bigger storages
            t = t.clone()
        if shard and shard_bytes + size > limit:
            flush()
        shard[name] = t
        weight_map[name] = len(tmp_names)
        shard_bytes += size
        total += size
    if shard or not tmp_names:
        flush()
    n = len(tmp_names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, name in zip(tmp_names, final, strict=True):
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, name))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in weight_map.items()}}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return final


WRITER = "HF export"  # the writer named in an export folder's manifest (convert and the hf_checkpointer callback)
OVERWRITE_DOES = ("the export replaces config.json, the weights, the tokenizer files and the other files of the "
                  "names it writes, and removes other weight files (*.safetensors, pytorch_model*.bin and their "
                  "indexes) that transformers would load instead of its own or mix with them")


def _other_weights(name: str) -> bool:
    """Files in a model folder that would mix with the weights a full export writes."""
    return (name.endswith(".safetensors") or name in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
            or (name.startswith("pytorch_model") and name.endswith(".bin")))


def check_export_target(out_dir: str, overwrite: bool = False, flags: Tuple[str, str] = ("out_dir", "overwrite=True")):
    """Check, before any work (nothing is written), that an export may write `out_dir`: new, empty, an
    earlier export of ours (its manifest), or `overwrite`; else a UserError naming the folder and `flags[1]`."""
    claim_folder(out_dir, WRITER, flags[0], overwrite, mark=False, overwrite_flag=flags[1], overwrite_does=OVERWRITE_DOES)


def _staged_export(out_dir: str, overwrite: bool, flags: Tuple[str, str], weights: bool):
    """The export is written into a staging folder, then moved into `out_dir` (files.staged_folder)."""
    return staged_folder(out_dir, WRITER, flags[0], overwrite, _other_weights if weights else None,
                         overwrite_flag=flags[1], overwrite_does=OVERWRITE_DOES)


def write_hf_folder(config, state_dict: Mapping[str, torch.Tensor], out_dir: Union[str, os.PathLike],
                    tokenizer=None, dtype: torch.dtype = torch.float32,
                    max_shard_size: Union[int, str] = "5GB", log=print, overwrite: bool = False,
                    flags: Tuple[str, str] = ("out_dir", "overwrite=True")) -> str:
    """Write `out_dir` as a Hugging Face folder for `MPTForCausalLM` weights; returns its path.

    `config` is an `MPTConfig`; `state_dict` maps HF parameter names to tensors (it may load them
    lazily). Native `model_type: mpt` when stock transformers can represent the config, else a
    self-contained `trust_remote_code` folder; `log` receives the message saying which and why.

    `out_dir` must be new, empty or an earlier export of ours (its manifest, see files.py), whose files
    are then replaced; else `overwrite` (see OVERWRITE_DOES). `flags` name the folder and the
    overwrite switch in messages (the CLI's `--hf_output_path`, `--overwrite`).
    The files are written into a staging folder inside `out_dir` and moved into place at the end.
    """


    out_dir = os.fspath(out_dir)
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    names = check_state_dict(model, state_dict, f"export to {out_dir}",
                             "nothing was written; give the state dict of the model this config describes")
    blockers = native_blockers(config)
    ids = _special_token_ids(config, tokenizer)
    with _staged_export(out_dir, overwrite, flags, weights=True) as staging:
        if blockers:
            write_remote_code(config, staging, dtype, ids)
        else:
            native_config(config, dtype, tokenizer).save_pretrained(staging)
        items = ((name, state_dict[name]) for name in names)  # each tensor loaded only when written
        shards = write_shards(items, staging, dtype, max_shard_size)
        GenerationConfig(**{k: v for k, v in ids.items() if v is not None}).save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    if blockers:
        log("stock transformers' MptForCausalLM cannot represent this model; wrote a custom-code folder "
            "(load it with trust_remote_code=True). Keys preventing a native export:\n"
            + "\n".join(f"  - {b}" for b in blockers))
    else:
        log("wrote a native transformers MPT folder (model_type mpt): "
            "AutoModelForCausalLM.from_pretrained loads it without trust_remote_code")
    log(f"{out_dir}: {len(shards)} safetensors shard(s), dtype {str(dtype).replace('torch.', '')}"
        + (", tokenizer" if tokenizer is not None else ", no tokenizer"))
    return out_dir


def write_lora_folder(model, out_dir: Union[str, os.PathLike], tokenizer=None, dtype: torch.dtype = torch.float32,
                      adapter_only: bool = False, max_shard_size: Union[int, str] = "5GB", log=print,
                      overwrite: bool = False, flags: Tuple[str, str] = ("out_dir", "overwrite=True")) -> str:
    """Export a LoRA `peft.PeftModel` around our MPT (it is consumed): by default the adapters merged
    into the base weights (peft's `merge_and_unload`) and written by `write_hf_folder` (a native folder
    when stock transformers can represent the model); with `adapter_only`, peft's adapter folder
    (`save_pretrained`: adapter_config.json, adapter_model.safetensors) plus the tokenizer, which
    `peft.PeftModel.from_pretrained` applies to the base model (module names are transformers' Mpt names).
    `out_dir`, `overwrite` and `flags` as for `write_hf_folder`."""
    out_dir = os.fspath(out_dir)
    config = model.get_base_model().config
    if not adapter_only:
        log("merging the LoRA adapters into the base weights")
        return write_hf_folder(config, model.merge_and_unload(safe_merge=True).state_dict(), out_dir, tokenizer, dtype,
                               max_shard_size, log, overwrite, flags)
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:  # the adapter's own weights only
            param.data = param.data.to(dtype)
    with _staged_export(out_dir, overwrite, flags, weights=False) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    base = model.peft_config[model.active_adapter].base_model_name_or_path
    where = ("stock transformers' MptForCausalLM" if not native_blockers(config) else
             "this model's custom-code folder (trust_remote_code=True; stock Mpt cannot represent it)")
    log(f"wrote a PEFT adapter folder {out_dir} (adapter_config.json, adapter_model.safetensors, dtype "
        f"{str(dtype).replace('torch.', '')}): peft.PeftModel.from_pretrained applies it to {where}"
        + (f"; base model: {base}" if base else ""))
    return out_dir
