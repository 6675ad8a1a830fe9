"""Multi-turn chat in MPT-7B-Chat's ChatML format, streaming the reply as it is generated.

The model sees the whole conversation each turn::

    <|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n{message}<|im_end|>\\n
    <|im_start|>assistant\\n{reply}<|im_end|>\\n ... <|im_start|>assistant\\n

and a reply ends at `<|im_end|>` (or the tokenizer's EOS). When the conversation no longer fits in
`max_seq_len`, the oldest exchanges are dropped (the system prompt stays). `/clear` forgets the
conversation, `/quit` (or end of input) leaves.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, TextIO

from transformers import TextStreamer

from llmfoundry_lite.data.chat import IM_END, IM_START, MPT_SYSTEM_PROMPT, check_messages
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.inference.generate import SamplingOptions, generate
from llmfoundry_lite.inference.loading import add_model_arguments, open_model


def chatml(messages: List[dict], add_generation_prompt: bool = True) -> str:
    """The ChatML text of a chat, checked as training data is (roles, order, string contents)."""
    check_messages(messages, for_training=False)
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")


class _Streamer(TextStreamer):
    """transformers' word-by-word streamer, writing to any text stream instead of stdout."""

    def __init__(self, tokenizer, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def chat_stop_ids(tokenizer) -> List[int]:
    """Where an assistant's reply ends: ChatML's end token and the tokenizer's EOS (a UserError when the
    tokenizer lacks the ChatML tokens)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (IM_START, IM_END)]
    if tokenizer.unk_token_id in ids or None in ids:
        raise UserError(f"the tokenizer has no {IM_START}/{IM_END} tokens, which ChatML needs; add them as "
                        "special tokens (the tokenizers `data-prep train-tokenizer` writes have them)")
    return [ids[1]] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


class ChatSession:
    """A conversation with one model; `reply(message)` streams and returns the assistant's answer."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = MPT_SYSTEM_PROMPT, **sampling):
        self.stop_ids = chat_stop_ids(tokenizer)
        self.model, self.tokenizer, self.sampling = model, tokenizer, SamplingOptions(**sampling).checked()
        self.system = [{"role": "system", "content": system_prompt}] if system_prompt else []
        self.messages: List[dict] = []

    def clear(self) -> None:
        self.messages = []

    def prompt(self) -> str:
        return chatml(self.system + self.messages)

    def _fit(self) -> bool:
        """Drop the oldest exchanges until the prompt plus a full reply fits; False if even one message won't."""
        budget = self.model.config.max_seq_len - self.sampling.max_new_tokens
        while len(self.tokenizer(self.prompt())["input_ids"]) > budget:
            if len(self.messages) <= 1:
                return False
            self.messages = self.messages[2:]  # one user message and its reply
        return True

    def reply(self, message: str, out: Optional[TextIO] = None) -> Optional[str]:
        out = out or sys.stdout
        self.messages.append({"role": "user", "content": message})
        if not self._fit():
            self.messages.pop()
            out.write("(message too long for the model's context; send a shorter one)\n")
            return None
        prompt = self.prompt()
        text = generate(self.model, self.tokenizer, [prompt], eos_token_id=self.stop_ids,
                        streamer=_Streamer(self.tokenizer, out), **vars(self.sampling))[0][len(prompt):]
        self.messages.append({"role": "assistant", "content": text})
        return text


def chat_loop(session: ChatSession, inp: Optional[TextIO] = None, out: Optional[TextIO] = None) -> None:
    """Read messages from `inp` (stdin) until /quit or end of input; stream replies to `out` (stdout)."""
    inp, out = inp or sys.stdin, out or sys.stdout
    out.write("Chat: type a message; /clear forgets the conversation, /quit leaves.\n")
    while True:
        out.write("User: ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/quit":
            return
        message = line.rstrip("\n")
        if message.strip() == "/clear":
            session.clear()
            out.write("(conversation cleared)\n")
        elif message.strip():
            out.write("Assistant: ")
            session.reply(message, out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system_prompt", default=MPT_SYSTEM_PROMPT, help="'' for none")
    SamplingOptions.add_arguments(parser, max_new_tokens=256)


def run(args: argparse.Namespace) -> int:
    sampling = SamplingOptions.from_args(args)
    model, tokenizer = open_model(args)
    chat_loop(ChatSession(model, tokenizer, args.system_prompt, **vars(sampling)))
    return 0
