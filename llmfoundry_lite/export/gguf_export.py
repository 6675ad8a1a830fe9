"""Writing one GGUF file, llama.cpp's format (llama-cli, llama-server, Ollama, LM Studio), of an MPT model.

llama.cpp runs MPT with its own graph (llama.cpp's `src/models/mpt.cpp`), which fixes what a file can
describe. `gguf_blockers` lists every setting that graph would compute differently, each checked against
that code; options it does not know block too, so a file never runs with wrong numerics. The graph has:
- token embeddings, optional learned position embeddings, a final LayerNorm and an output matrix (the
  embedding itself when tied);
- per block: LayerNorm, a fused q|k|v projection (an unfused one is concatenated here) with optional
  clamping (`clip_qkv`), optional LayerNorms over all of q and over all of k (`qk_ln`, its k norm sized
  d_model wide: multi-head attention only), multi-, grouped- or multi-query attention scaled by
  1/sqrt(head_dim) with ALiBi of a given maximum bias (or none), an output projection, LayerNorm, and an
  up / GELU / down MLP of any width; every linear layer and norm may have a bias;
- no RoPE, sliding window, soft-capping, temperature tuning, prefix-LM, GLU or mixture of experts, and
  no per-block overrides.
Its GELU is the tanh approximation (through a float16 table on CPU) where MPT's is exact; the two differ
by about 1e-3, which the llama.cpp tests measure as perplexity (tests/test_gguf_llamacpp.py).

The tokenizer goes inside: a byte-level BPE (tokenizer.json's ByteLevel pre-tokenizer, GPT-2's split, which
is llama.cpp's `gpt-2` / `mpt` pre-tokenizer) with its merges, special tokens, whether it adds BOS/EOS, and
its chat template (gguf's SpecialVocab reads those from the saved tokenizer). Tokens the embedding has
beyond the vocabulary (a padded vocab_size) are written as unused `[PAD<id>]` entries.

1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them; 2-D ones take the chosen
type. q8_0 stores each row in blocks of 32 values: a tensor whose rows are not a multiple of 32 stays
f16, said in the log, so the file is always complete. The header is written first and each tensor is
then converted and appended on its own, so peak memory is about one tensor.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from typing import Dict, List, Mapping, Tuple

import gguf
import numpy as np
import torch

from llmfoundry_lite.assembly.weights import check_state_dict
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.hf_export import config_blockers
from llmfoundry_lite.files import check_folder_path
from llmfoundry_lite.models import MPTForCausalLM

Q = gguf.GGMLQuantizationType
PRECISIONS = {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}
_FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
               Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
WRITER_KEY = "llmfoundry_lite.writer"  # marks a file this export wrote: a later export may replace it
WRITER = "convert --gguf_output_path"

# Keys the file carries (see gguf_blockers' docstring) or that do not change what an eval-mode forward
# computes (dropout, init, kernels, bookkeeping, RoPE settings when RoPE is off).
_CARRIED_OR_NEUTRAL = {
    "d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size", "layer_norm_epsilon",
    "attn_type", "kv_n_heads", "fused_qkv", "clip_qkv", "alibi", "alibi_bias_max", "learned_pos_emb", "no_bias",
    "attention_bias", "ffn_hidden_size", "tie_word_embeddings", "attn_pdrop", "resid_pdrop", "emb_pdrop",
    "embedding_fraction", "attn_impl", "attn_uses_sequence_id", "init_config", "init_device", "use_cache",
    "initializer_range", "verbose", "tokenizer_name", "use_pad_tok_in_ffn", "fc_type", "rope_theta", "rope_impl",
    "rope_dail_config", "rope_hf_config", "model_type",
}


def _gguf_checks(cfg) -> Dict[str, Tuple[bool, str]]:
    """key path -> (llama.cpp's MPT graph computes the same, why not)."""
    attn, ffn = cfg.attn_config, cfg.ffn_config
    scale = attn.get("softmax_scale")
    return {
        "attn_config.rope": (not attn["rope"], "llama.cpp's MPT has no RoPE (ALiBi, learned positions or none)"),
        "attn_config.qk_gn": (not attn["qk_gn"], "llama.cpp's MPT normalizes q and k across all heads (qk_ln), "
                                                 "not per head"),
        "attn_config.qk_ln": (not attn["qk_ln"] or cfg.kv_n_heads == cfg.n_heads,
                              "llama.cpp's MPT sizes the k LayerNorm d_model wide, so qk_ln needs multi-head "
                              "attention (not grouped- or multi-query)"),
        "attn_config.alibi_bias_max": (not attn["alibi"] or attn["alibi_bias_max"] > 0,
                                       "llama.cpp's MPT switches ALiBi off at a maximum bias of 0 or below"),
        "attn_config.clip_qkv": (attn["clip_qkv"] is None or attn["clip_qkv"] > 0,
                                 "llama.cpp's MPT clamps q, k, v only at a positive clip_qkv"),
        "attn_config.softmax_scale": (scale is None or math.isclose(scale, cfg.head_dim ** -0.5),
                                      "llama.cpp's MPT scales attention by 1/sqrt(head_dim)"),
        "attn_config.sliding_window_size": (attn["sliding_window_size"] == -1,
                                            "llama.cpp's MPT has no sliding window"),
        "attn_config.attn_logit_softcapping": (not attn["attn_logit_softcapping"],
                                               "llama.cpp's MPT has no attention soft-capping"),
        "attn_config.attn_temperature_tuning": (not attn["attn_temperature_tuning"].get("attn_scale"),
                                                "llama.cpp's MPT has no attention temperature tuning"),
        "attn_config.prefix_lm": (not attn["prefix_lm"], "llama.cpp's MPT is causal only"),
        "head_dim": (cfg.head_dim * cfg.n_heads == cfg.d_model,
                     "llama.cpp's MPT needs heads d_model // n_heads wide (its q and output projections are "
                     "d_model x d_model)"),
        "norm_type": (cfg.norm_type.lower() in ("layernorm", "low_precision_layernorm"),
                      "llama.cpp's MPT uses LayerNorm"),
        "ffn_config.ffn_type": (ffn["ffn_type"] == "mptmlp",
                                "llama.cpp's MPT has a plain up / GELU / down MLP (no GLU, no mixture of experts)"),
        "ffn_config.ffn_act_fn": (ffn["ffn_act_fn"].get("name") == "gelu", "llama.cpp's MPT uses GELU"),
        "logit_scale": (cfg.logit_scale in (None, 1, 1.0), "llama.cpp's MPT does not scale logits"),
        "final_logit_softcapping": (not getattr(cfg, "final_logit_softcapping", None),
                                    "llama.cpp's MPT has no logit soft-capping"),
        "block_overrides": (not cfg.block_overrides, "llama.cpp's MPT gives every block the same attention"),
    }


def gguf_blockers(config) -> List[str]:
    """'key = value: reason' for every setting llama.cpp's MPT cannot represent."""
    return config_blockers(config, _gguf_checks(config), _CARRIED_OR_NEUTRAL, "not known to the GGUF export")


# --- the tokenizer --------------------------------------------------------------------------------------------
def _tokenizer_problem(tokenizer) -> str:
    """Why llama.cpp would tokenize differently from `tokenizer` ('' when it would not)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return (f"a {type(tokenizer).__name__} has no tokenizer.json; GGUF carries byte-level BPE tokenizers "
                "(a fast tokenizer)")
    spec = json.loads(backend.to_str())
    model, pre, norm = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("normalizer")
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("ignore_merges"):
        return (f"tokenizer.json model {model.get('type')!r} (byte_fallback, continuing_subword_prefix, "
                "end_of_word_suffix and ignore_merges unset): GGUF carries a plain byte-level BPE model only")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        return (f"tokenizer.json pre_tokenizer {json.dumps(pre)}: llama.cpp splits text as ByteLevel(use_regex=true, "
                "add_prefix_space=false) does (GPT-2's pattern); another split would tokenize differently")
    if norm is not None and norm.get("type") != "NFC":  # NFC (GPT-NeoX's) is kept, as llama.cpp's converter does:
        # text already in NFC, which nearly all is, tokenizes the same
        return f"tokenizer.json normalizer {norm.get('type')!r}: llama.cpp's byte-level BPE does not normalize text"
    stripped = [t["content"] for t in spec.get("added_tokens", []) if t.get("lstrip") or t.get("rstrip")
                or t.get("single_word")]
    if stripped:
        return (f"added tokens {stripped[:5]} strip spaces around them or match single words only, which "
                "llama.cpp does not do")
    return ""


def _vocab(tokenizer, n_vocab: int) -> Tuple[List[str], List[int]]:
    """(token strings, token types) for every embedding row; rows beyond the vocabulary are unused pads."""
    backend = tokenizer.backend_tokenizer
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:  # matched on raw text by llama.cpp; special ones only when asked to parse specials
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds(tokenizer) -> Dict[str, bool]:
    """Whether encoding text adds BOS / EOS, as the tokenizer really does it; anything else it adds is a
    UserError (llama.cpp adds only those two)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos = full[:1] == [tokenizer.bos_token_id] and full[1:len(plain) + 1] == plain
    eos = full[-1:] == [tokenizer.eos_token_id] and len(full) == len(plain) + bos + 1
    if full != [tokenizer.bos_token_id] * bos + plain + [tokenizer.eos_token_id] * eos:
        raise UserError(f"the tokenizer turns 'a' into {full} (without its special tokens: {plain}); llama.cpp can "
                        "add only BOS before and EOS after the text, so it would tokenize differently")
    return {"bos": bos, "eos": eos}


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens, types = _vocab(tokenizer, n_vocab)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("mpt" if spec.get("normalizer") else "gpt-2")  # the same split; names as llama.cpp's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads the files save_pretrained writes
        tokenizer.save_pretrained(folder)
        try:
            special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=n_vocab)
        except ValueError as e:  # merges in a layout gguf does not know
            raise UserError(f"the tokenizer's merges cannot go into a GGUF file: {e}") from None
    special.add_special_token = _adds(tokenizer)
    special.add_to_gguf(writer, quiet=True)


# --- the weights ----------------------------------------------------------------------------------------------
def _plan(config, names: List[str]) -> Dict[str, List[str]]:
    """GGUF tensor name -> our tensor names (several for an unfused q, k, v: concatenated in that order)."""
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MPT, config.n_layers)
    plan: Dict[str, List[str]] = {}
    for name in names:
        fused = re.sub(r"\.attn\.W[qkv]\.", ".attn.Wqkv.", name)
        target = mapping.get_name(fused, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise UserError(f"{name}: no GGUF tensor holds this weight of the model; nothing was written")
        plan.setdefault(target, []).append(name)
    return plan


def _tensor_type(shape, qtype: Q) -> Q:
    if len(shape) == 1:
        return Q.F32
    if qtype == Q.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16
    return qtype


def _info(shape, qtype: Q) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(stored shape, numpy dtype, bytes) of a tensor of `shape` in `qtype`, as GGUFWriter stores it."""
    if qtype in (Q.F32, Q.F16):
        dtype = np.dtype(np.float32 if qtype == Q.F32 else np.float16)
        return tuple(shape), dtype, math.prod(shape) * dtype.itemsize
    stored = gguf.quant_shape_to_byte_shape(shape, qtype)
    return stored, np.dtype(np.uint8), math.prod(stored)


def _row_key(config, width: int) -> str:
    return "d_model" if width == config.d_model else "ffn_config.ffn_hidden_size"


def write_gguf(config, weights: Mapping[str, torch.Tensor], tokenizer, path: str, precision: str = "fp16",
               log=print) -> str:
    """Write the GGUF file `path` of an `MPTConfig` and its weights (HF names; a lazy mapping is read tensor
    by tensor) with `tokenizer` inside; `precision` is fp32, fp16, bf16 or q8_0. Settings llama.cpp cannot
    represent, a tokenizer it would read differently, or weights that do not fit are refused (UserError)
    before anything is written. The file appears whole or not at all (written beside, then renamed)."""
    blockers = gguf_blockers(config)
    if blockers:
        raise UserError("llama.cpp's MPT cannot represent this model, so no GGUF was written. Keys:\n"
                        + "\n".join(f"  - {b}" for b in blockers)
                        + "\nexport a Hugging Face folder instead (--hf_output_path)")
    if tokenizer is None:
        raise UserError("a GGUF file holds its tokenizer, and none came with the model; pass --tokenizer FOLDER")
    problem = _tokenizer_problem(tokenizer)
    if problem:
        raise UserError(f"the tokenizer cannot go into a GGUF file: {problem}; nothing was written")
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size "
                        f"{config.vocab_size}: it is not this model's tokenizer; pass the one it was trained with")
    qtype = PRECISIONS[precision]
    with torch.device("meta"):
        model = MPTForCausalLM(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = check_state_dict(model, weights, f"export to {path}",
                             "nothing was written; give the weights of the model this config describes")
    given = set(names)
    plan = _plan(config, [k for k in shapes if k in given])  # the model's order: an unfused q, k, v in that order
    types = {}
    for target, sources in plan.items():
        shape = (sum(shapes[s][0] for s in sources), *shapes[sources[0]][1:])
        types[target] = (shape, _tensor_type(shape, qtype))
    kept = sorted({t for t, (shape, tt) in types.items() if tt != qtype and len(shape) > 1})
    if kept:
        widths = sorted({types[t][0][-1] for t in kept})
        keys = ", ".join(f"{_row_key(config, w)} = {w}" for w in widths)
        log(f"q8_0 stores rows in blocks of 32 values, and {keys} (not a multiple of 32) sets the row length of "
            f"{len(kept)} tensor(s): they stay f16: {', '.join(kept)}")

    partial = f"{path}.tmp"  # files.atomic_write's convention: written beside, renamed over `path` when whole
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MPT])
    _add_header(writer, config, qtype, os.path.splitext(os.path.basename(path))[0])
    _add_tokenizer(writer, tokenizer, config.vocab_size)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        for target, (shape, tt) in types.items():
            stored, dtype, nbytes = _info(shape, tt)
            writer.add_tensor_info(target, stored, dtype, nbytes, raw_dtype=None if tt in (Q.F32, Q.F16) else tt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for target, sources in plan.items():
            tensor = torch.cat([weights[s].detach().float() for s in sources]) if len(sources) > 1 \
                else weights[sources[0]].detach().float()
            writer.write_tensor_data(gguf.quants.quantize(tensor.cpu().numpy(), types[target][1]))
        writer.close()
        os.replace(partial, path)
    except OSError as e:  # an unwritable folder, a full disk
        raise UserError(f"cannot write {path}: {e.strerror or e}; no GGUF was written") from None
    finally:
        writer.close()
        if os.path.exists(partial):
            os.remove(partial)
    log(f"{path}: GGUF ({precision}, llama.cpp architecture mpt), {len(plan)} tensors, "
        f"{os.path.getsize(path) / 2 ** 20:.1f} MiB, tokenizer with {len(tokenizer)} tokens"
        + (", chat template" if getattr(tokenizer, "chat_template", None) else ""))
    return path


def _add_header(writer: gguf.GGUFWriter, config, qtype: Q, name: str) -> None:
    """The model's hyper-parameters under llama.cpp's MPT keys (what its loader reads)."""
    attn = config.attn_config
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[qtype])
    if qtype == Q.Q8_0:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.ffn_hidden_size)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.kv_n_heads)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    if attn["clip_qkv"] is not None:
        writer.add_clamp_kqv(attn["clip_qkv"])
    writer.add_max_alibi_bias(attn["alibi_bias_max"] if attn["alibi"] else 0.0)
    writer.add_string(WRITER_KEY, WRITER)


def written_by_us(path: str) -> bool:
    """Whether `path` is a GGUF file this export wrote (its header names us)."""
    try:
        field = gguf.GGUFReader(path).get_field(WRITER_KEY)
    except Exception:  # noqa: BLE001  (not a GGUF file, or a damaged one: either way not ours to replace)
        return False
    return field is not None and field.contents() == WRITER


def check_gguf_target(path: str, overwrite: bool, flags: Tuple[str, str]) -> None:
    """Before any work: `path` is a new file name, a GGUF this export wrote, or `overwrite` is given."""
    if os.path.isdir(path):
        raise UserError(f"{flags[0]} {path} is a folder; give the file to write, e.g. {os.path.join(path, 'model.gguf')}")
    check_folder_path(os.path.dirname(os.path.abspath(path)), flags[0])
    if os.path.exists(path) and not overwrite and not written_by_us(path):
        raise UserError(f"{flags[0]} {path} exists and is not a GGUF file this command wrote; nothing was "
                        f"changed. Choose a new file name, or pass {flags[1]} to replace it")
