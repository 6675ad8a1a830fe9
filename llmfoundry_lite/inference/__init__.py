"""Inference: batched generation, ChatML chat and an HTTP endpoint (the OpenAI API, continuous batching).

`generate(model, tokenizer, prompts, ...)` is the function the three commands share;
`load_model_and_tokenizer(path, device, dtype)` opens a model folder or a Composer checkpoint.
"""
from llmfoundry_lite.inference.chat import ChatSession
from llmfoundry_lite.inference.generate import Generations, generate
from llmfoundry_lite.inference.loading import load_model_and_tokenizer
from llmfoundry_lite.inference.serve import make_server

__all__ = ["generate", "Generations", "load_model_and_tokenizer", "ChatSession", "make_server"]
