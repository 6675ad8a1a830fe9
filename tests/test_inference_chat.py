"""ChatML chat: a scripted multi-turn session must feed the model the exact ChatML token sequence
(the truth is the tokenizer's own ChatML chat template), stream the reply, stop at <|im_end|>,
and obey /clear and /quit."""
import io

import pytest
import torch

from llmfoundry_lite.cli import main as cli
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export import write_hf_folder
from llmfoundry_lite.inference.chat import ChatSession, chat_loop
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")
SYSTEM = "You are terse."


@pytest.fixture()
def model_and_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=len(tokenizer)))
    return model.eval(), tokenizer


def _record_prompts(model):
    """Wrap model.generate to record the input ids of every call."""
    seen, original = [], model.generate

    def spy(**kw):
        seen.append(kw["input_ids"][0].tolist())
        return original(**kw)
    model.generate = spy
    return seen


def test_scripted_session_feeds_the_exact_chatml_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    seen = _record_prompts(model)
    session = ChatSession(model, tokenizer, SYSTEM, max_new_tokens=5)
    out = io.StringIO()
    chat_loop(session, io.StringIO("Hello there\nWhat is a path?\n/clear\nAgain\n/quit\nnever read\n"), out)
    assert len(seen) == 3
    replies = [m["content"] for m in session.messages if m["role"] == "assistant"]

    system = {"role": "system", "content": SYSTEM}
    turn1 = [system, {"role": "user", "content": "Hello there"}]
    first_reply = out.getvalue().split("Assistant: ")[1].split("\nUser: ")[0]
    turn2 = turn1 + [{"role": "assistant", "content": first_reply}, {"role": "user", "content": "What is a path?"}]
    turn3 = [system, {"role": "user", "content": "Again"}]  # after /clear
    for ids, messages in zip(seen, (turn1, turn2, turn3), strict=True):
        assert ids == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
    assert tokenizer.decode(seen[0]) == ("<|im_start|>system\nYou are terse.<|im_end|>\n"
                                         "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n")
    assert replies == [out.getvalue().split("Assistant: ")[3].split("\nUser: ")[0]]  # only the turn after /clear
    assert "(conversation cleared)" in out.getvalue() and out.getvalue().endswith("User: ")


def test_reply_stops_at_im_end(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    boost = torch.zeros(len(tokenizer))
    boost[im_end] = 1e4
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + boost)
    seen = _record_prompts(model)
    session = ChatSession(model, tokenizer, SYSTEM, max_new_tokens=20)
    assert session.reply("hi", io.StringIO()) == ""
    session.reply("and?", io.StringIO())
    assert tokenizer.decode(seen[1]).endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nand?<|im_end|>\n"
                                              "<|im_start|>assistant\n")


def test_old_turns_are_dropped_when_the_context_is_full(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.config.max_seq_len = 64
    session = ChatSession(model, tokenizer, None, max_new_tokens=8)
    for i in range(4):
        session.reply(f"message number {i}", io.StringIO())
    assert session.messages[0]["content"] != "message number 0"
    assert len(tokenizer(session.prompt())["input_ids"]) <= 64
    out = io.StringIO()
    assert session.reply("word " * 80, out) is None and "too long" in out.getvalue()


def test_chat_needs_chatml_tokens(model_and_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "<eos>": 2}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(UserError, match="<\\|im_start\\|>/<\\|im_end\\|>"):
        ChatSession(model_and_tokenizer[0], plain)


def test_chat_command_reads_stdin(model_and_tokenizer, tmp_path, monkeypatch, capsys):
    model, tokenizer = model_and_tokenizer
    write_hf_folder(model.config, model.state_dict(), tmp_path, tokenizer, log=lambda m: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/quit\n"))
    assert cli(["chat", str(tmp_path), "--max_new_tokens", "3", "--system_prompt", "", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.count("User: ") == 2
