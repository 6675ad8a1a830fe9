"""Opening a model for inference, and the command-line flags the generate/chat/serve commands share."""
from __future__ import annotations

import argparse
from typing import Optional, Tuple, Union

import torch

from llmfoundry_lite import opening
from llmfoundry_lite.assembly.lora import merged
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.hf_export import PRECISIONS as DTYPES


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):  # half precision on GPU, full precision on CPU (CPU half matmuls are slow)
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


def load_model_and_tokenizer(path: str, device: Optional[str] = "cpu", dtype=None, tokenizer: Optional[str] = None,
                             max_seq_len: Optional[int] = None, adapter: Optional[str] = None
                             ) -> Tuple[torch.nn.Module, object]:
    """(MPTForCausalLM in eval mode on `device`/`dtype`, tokenizer) from a model folder or a Composer
    checkpoint (`.pt` file or sharded folder), with the PEFT adapter folder `adapter` applied; LoRA
    adapters (`adapter`'s or a LoRA run's checkpoint's) are merged into the weights, so inference runs
    the plain model. `tokenizer` overrides the one stored with the model;
    `max_seq_len` replaces the model's (longer: ALiBi or RoPE extrapolation, as MPT-7B-StoryWriter's card
    raises it to 83968)."""
    device = resolve_device(device)
    model, tok = opening.open_model(path, tokenizer, adapter)
    model = merged(model)
    if max_seq_len is not None:
        if model.config.position_scheme == "learned" and max_seq_len > model.config.max_seq_len:
            raise UserError(f"--max_seq_len {max_seq_len}: this model learned position embeddings for "
                            f"{model.config.max_seq_len} positions only; longer inputs need an ALiBi or RoPE model")
        model.config.max_seq_len = max_seq_len
    return model.to(device=device, dtype=resolve_dtype(dtype, device)).eval(), tok


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model to open: positional MODEL (or llm-foundry's --name_or_path), --tokenizer, --device, --dtype,
    --max_seq_len, --adapter."""
    parser.add_argument("model", nargs="?",
                        help="an HF model folder, a Composer .pt checkpoint, or a sharded checkpoint folder")
    parser.add_argument("--name_or_path", dest="name_or_path", default=None, help="same as MODEL")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or name (default: the model's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--max_seq_len", type=int, default=None,
                        help="replace the model's max_seq_len (ALiBi/RoPE models extrapolate to longer inputs)")
    parser.add_argument("--adapter", default=None,
                        help="a PEFT (LoRA) adapter folder to apply to MODEL, e.g. from convert --adapter_only")


def open_model(args: argparse.Namespace):
    path = getattr(args, "model", None) or args.name_or_path
    if not path:
        raise UserError("no model given: pass a model folder or checkpoint as MODEL or --name_or_path")
    return load_model_and_tokenizer(path, args.device, args.dtype, args.tokenizer, args.max_seq_len,
                                    args.adapter)
