"""GGUF export: what the file holds, read back with the `gguf` package's reader (llama.cpp's own Python
reader), what is refused before anything is written, and which files may be replaced.

Whether llama.cpp runs the file as our model does (tokens, chat template, greedy continuations,
perplexity) is tests/test_gguf_llamacpp.py's job, with llama.cpp itself (`make gguf-check`).
"""
import json
import os

import gguf
import numpy as np
import pytest
import torch

from llmfoundry_lite import MPTConfig, MPTForCausalLM
from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.export.gguf_export import WRITER_KEY, write_gguf
from llmfoundry_lite.export.hf_export import write_hf_folder

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TINY = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=640)
# everything llama.cpp's MPT carries, off its defaults: biases, an untied output matrix, learned positions
# without ALiBi, grouped-query attention from unfused q/k/v, clamping, another eps and FFN width
CARRIED = dict(no_bias=False, tie_word_embeddings=False, learned_pos_emb=True, layer_norm_epsilon=1e-6,
               attn_config=dict(alibi=False, attn_type="grouped_query_attention", kv_n_heads=2, fused_qkv=False,
                                clip_qkv=6.0),
               ffn_config=dict(ffn_type="mptmlp", ffn_hidden_size=96))


def _model(**overrides):
    torch.manual_seed(0)
    return MPTForCausalLM(MPTConfig(**{**TINY, **overrides})).eval()


def _read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _values(t) -> np.ndarray:
    """A tensor as float32 in torch's (rows, columns) order."""
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


@pytest.mark.parametrize("overrides", [{}, CARRIED], ids=["defaults", "every-carried-option"])
def test_fp32_file_holds_the_exact_weights_hyperparameters_and_tokenizer(overrides, tok, tmp_path):
    model = _model(**overrides)
    cfg = model.config
    path = write_gguf(cfg, model.state_dict(), tok, str(tmp_path / "m.gguf"), "fp32", log=lambda m: None)
    fields, tensors = _read(path)

    sd = model.state_dict()
    expected = {"token_embd.weight": sd["transformer.wte.weight"], "output_norm.weight": sd["transformer.norm_f.weight"]}
    for i in range(cfg.n_layers):
        attn = f"transformer.blocks.{i}.attn."
        qkv = sd[attn + "Wqkv.weight"] if cfg.attn_config["fused_qkv"] else \
            torch.cat([sd[attn + n + ".weight"] for n in ("Wq", "Wk", "Wv")])
        expected[f"blk.{i}.attn_qkv.weight"] = qkv
        expected[f"blk.{i}.ffn_down.weight"] = sd[f"transformer.blocks.{i}.ffn.down_proj.weight"]
        if not cfg.no_bias:
            expected[f"blk.{i}.attn_qkv.bias"] = torch.cat([sd[attn + n + ".bias"] for n in ("Wq", "Wk", "Wv")])
            expected[f"blk.{i}.ffn_norm.bias"] = sd[f"transformer.blocks.{i}.norm_2.bias"]
    if overrides:
        expected["output.weight"] = sd["lm_head.weight"]
        expected["position_embd.weight"] = sd["transformer.wpe.weight"]
    else:
        assert "output.weight" not in tensors  # tied: llama.cpp uses the embedding
    for name, value in expected.items():
        np.testing.assert_array_equal(_values(tensors[name]), value.numpy(), err_msg=name)
    # per block 4 weight matrices and 2 norms (each with a bias when biased); embedding, final norm
    n_per_block, n_outside = (6, 2) if cfg.no_bias else (12, 3)
    assert len(tensors) == n_outside + n_per_block * cfg.n_layers + (2 if overrides else 0)

    assert fields["general.architecture"] == "mpt"
    assert fields["mpt.context_length"] == cfg.max_seq_len and fields["mpt.embedding_length"] == cfg.d_model
    assert fields["mpt.block_count"] == cfg.n_layers and fields["mpt.feed_forward_length"] == cfg.ffn_hidden_size
    assert fields["mpt.attention.head_count"] == 4 and fields["mpt.attention.head_count_kv"] == cfg.kv_n_heads
    assert fields["mpt.attention.layer_norm_epsilon"] == pytest.approx(cfg.layer_norm_epsilon)
    assert fields["mpt.attention.max_alibi_bias"] == (0.0 if overrides else 8.0)
    assert fields.get("mpt.attention.clamp_kqv") == (6.0 if overrides else None)

    assert fields["tokenizer.ggml.model"] == "gpt2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size > len(tok)
    assert tokens[:len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[len(tok)] == f"[PAD{len(tok)}]"
    types = fields["tokenizer.ggml.token_type"]
    assert types[tok.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL
    assert types[len(tok)] == gguf.TokenType.UNUSED and types[300] == gguf.TokenType.NORMAL
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in merges]
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields[WRITER_KEY]


def test_fp16_and_q8_0_round_within_their_precision_and_odd_rows_stay_f16(tok, tmp_path):
    model = _model()
    weight = model.state_dict()["transformer.blocks.0.ffn.up_proj.weight"].numpy()
    for precision, kind, tol in (("fp16", gguf.GGMLQuantizationType.F16, 1e-3),
                                 ("q8_0", gguf.GGMLQuantizationType.Q8_0, 2e-2)):
        path = write_gguf(model.config, model.state_dict(), tok, str(tmp_path / f"{precision}.gguf"), precision,
                          log=lambda m: None)
        fields, tensors = _read(path)
        t = tensors["blk.0.ffn_up.weight"]
        assert t.tensor_type == kind and tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_allclose(_values(t), weight, atol=tol * np.abs(weight).max())
        assert not np.array_equal(_values(t), weight)

    odd = _model(d_model=48, ffn_config=dict(ffn_type="mptmlp", ffn_hidden_size=128))
    said = []
    path = write_gguf(odd.config, odd.state_dict(), tok, str(tmp_path / "odd.gguf"), "q8_0", log=said.append)
    _, tensors = _read(path)
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.F16      # rows of 48
    assert tensors["blk.0.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0   # rows of 128
    assert "d_model = 48 (not a multiple of 32)" in said[0] and "blk.0.ffn_up.weight" in said[0]


@pytest.fixture
def hf_folder(tok, tmp_path):
    def make(**overrides):
        model = _model(**overrides)
        folder = str(tmp_path / "hf")
        write_hf_folder(model.config, model.state_dict(), folder, tok, log=lambda m: None, overwrite=True)
        return folder
    return make


@pytest.mark.parametrize("overrides,key", [
    (dict(attn_config=dict(alibi=False, rope=True)), "attn_config.rope"),
    (dict(attn_config=dict(qk_gn=True)), "attn_config.qk_gn"),
    (dict(attn_config=dict(qk_ln=True, attn_type="grouped_query_attention", kv_n_heads=2)), "attn_config.qk_ln"),
    (dict(attn_config=dict(softmax_scale=0.5)), "attn_config.softmax_scale"),
    (dict(attn_config=dict(sliding_window_size=8)), "attn_config.sliding_window_size"),
    (dict(ffn_config=dict(ffn_type="mptglu")), "ffn_config.ffn_type"),
    (dict(ffn_config=dict(ffn_type="mptmlp", ffn_act_fn=dict(name="silu"))), "ffn_config.ffn_act_fn"),
    (dict(norm_type="rmsnorm"), "norm_type"),
    (dict(logit_scale=2.0), "logit_scale"),
    (dict(attn_config=dict(alibi_bias_max=0)), "attn_config.alibi_bias_max"),
    (dict(attn_config=dict(clip_qkv=0.0)), "attn_config.clip_qkv"),
])
def test_what_llama_cpp_cannot_represent_is_refused_naming_the_key(overrides, key, hf_folder, tmp_path, capsys):
    folder = hf_folder(**overrides)
    out = tmp_path / "m.gguf"
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"- {key} = " in err and "no GGUF was written" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "m.gguf.tmp").exists()


def _variant(tok, folder, change):
    """A copy of `tok` with `change(tokenizer)` applied, saved to `folder`."""
    from transformers import PreTrainedTokenizerFast
    other = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer.__class__.from_str(
        tok.backend_tokenizer.to_str()), eos_token=tok.eos_token, bos_token=tok.bos_token)
    change(other)
    other.save_pretrained(folder)
    return str(folder)


def _template(single):
    from tokenizers import processors

    def change(other):
        ids = [(t, other.convert_tokens_to_ids(t)) for t in ("<|endoftext|>", "<|im_start|>")]
        other.backend_tokenizer.post_processor = processors.TemplateProcessing(single=single, special_tokens=ids)
    return change


def test_a_tokenizer_llama_cpp_would_read_differently_is_refused(hf_folder, tok, tmp_path, capsys):
    from tokenizers import AddedToken, pre_tokenizers

    def digits(other):
        other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    cases = [(digits, "tokenizer.json pre_tokenizer"),
             (lambda other: other.add_tokens([AddedToken("<sep>", lstrip=True)]), "strip spaces"),
             (_template("<|im_start|> $A"), "can add only BOS")]
    folder, out = hf_folder(), tmp_path / "m.gguf"
    for i, (change, said) in enumerate(cases):
        assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out),
                    "--tokenizer", _variant(tok, tmp_path / f"tok{i}", change)]) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err and not out.exists(), err


def test_a_tokenizer_adding_bos_and_eos_says_so(hf_folder, tok, tmp_path):
    changed = _variant(tok, tmp_path / "tok", _template("<|endoftext|> $A <|endoftext|>"))
    out = str(tmp_path / "m.gguf")
    assert cli(["convert", "--hf_path", hf_folder(), "--gguf_output_path", out, "--tokenizer", changed]) == 0
    fields, _ = _read(out)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is True


def test_an_hf_folder_converts_to_what_its_weights_write(hf_folder, tok, tmp_path):
    """Read from a folder (whose safetensors list names alphabetically: Wk before Wq), the unfused q, k, v are
    still concatenated in that order."""
    folder = hf_folder(**CARRIED)
    out = str(tmp_path / "from_folder.gguf")
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", out, "--output_precision", "fp32"]) == 0
    model = _model(**CARRIED)
    direct = write_gguf(model.config, model.state_dict(), tok, str(tmp_path / "direct.gguf"), "fp32",
                        log=lambda m: None)
    ours, theirs = _read(out)[1], _read(direct)[1]
    assert list(ours) == list(theirs)
    for name, t in theirs.items():
        np.testing.assert_array_equal(_values(ours[name]), _values(t), err_msg=name)


def test_the_target_file_rule_and_the_flag_combinations(hf_folder, tmp_path, capsys):
    folder = hf_folder()
    out = tmp_path / "m.gguf"
    out.write_text("my notes")
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out)]) == 2
    assert "not a GGUF file this command wrote" in capsys.readouterr().err and out.read_text() == "my notes"
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out), "--overwrite"]) == 0
    first = out.stat().st_mtime_ns
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out), "--output_precision", "q8_0"]) == 0
    assert out.stat().st_mtime_ns != first and _read(str(out))[1]["token_embd.weight"].tensor_type == \
        gguf.GGMLQuantizationType.Q8_0  # an earlier export of ours is replaced without --overwrite
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert cli(["convert", "--hf_path", folder, "--gguf_output_path", str(out / "m.gguf")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err

    for argv, said in ((["--hf_output_path", str(tmp_path / "hf2"), "--output_precision", "q8_0"], "GGUF type"),
                       (["--hf_output_path", str(tmp_path / "hf2")], "--hf_path is for --gguf_output_path"),
                       (["--gguf_output_path", str(out), "--adapter_only"], "drop --adapter_only")):
        assert cli(["convert", "--hf_path", folder, *argv]) == 2
        assert said in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "hf2")
