"""`llmfoundry-lite convert` / `scripts/convert_composer_to_hf.py`: Composer checkpoint -> HF folder.

    llmfoundry-lite convert --composer_path run/checkpoints/latest-rank0.pt --hf_output_path out/hf \\
        --output_precision bf16 [--max_shard_size 5GB] [--adapter_only] [--overwrite]

A LoRA run's checkpoint converts to the model with its adapters merged into the base weights (a native
HF folder when stock transformers can represent the model), or with `--adapter_only` to a PEFT adapter
folder (adapter_config.json, adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on the
base model, or `--adapter` of generate/chat/serve/eval.

The output folder must be new, empty or an earlier export of ours (its `.llmfoundry_lite.json` lists
what it wrote, which is replaced); any other folder is refused before the checkpoint is read, unless
`--overwrite` (see hf_export.OVERWRITE_DOES: files of the names it writes and other weight files are
replaced, every other file is kept).

Works on CPU with no process group; tensors stream from the checkpoint into the safetensors
shards one at a time, and the optimizer state is never read.
"""
from __future__ import annotations

import argparse

from llmfoundry_lite.assembly.weights import model_from_weights
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.composer_checkpoint import read_composer_checkpoint
from llmfoundry_lite.export.hf_export import (
    OVERWRITE_DOES,
    PRECISIONS,
    check_export_target,
    write_hf_folder,
    write_lora_folder,
)


def convert_composer_to_hf(composer_path: str, hf_output_path: str, output_precision: str = "fp32",
                           max_shard_size="5GB", log=print, adapter_only: bool = False, overwrite: bool = False) -> str:
    """Write the HF folder of a full (.pt) or sharded Composer checkpoint (a LoRA run's: merged, or its
    adapter folder with `adapter_only`); returns the folder. A folder holding files that are not an
    earlier export of ours is refused before any work, unless `overwrite`."""
    flags = ("--hf_output_path", "--overwrite")
    check_export_target(hf_output_path, overwrite, flags)
    config, tokenizer, weights, lora = read_composer_checkpoint(composer_path)
    if lora is not None:
        model = model_from_weights(config, weights, composer_path, lora)
        return write_lora_folder(model, hf_output_path, tokenizer, PRECISIONS[output_precision], adapter_only,
                                 max_shard_size, log, overwrite, flags)
    if adapter_only:
        raise UserError(f"--adapter_only: {composer_path} is not a LoRA run's checkpoint (it has no adapters); "
                        "drop --adapter_only to export the model")
    return write_hf_folder(config, weights, hf_output_path, tokenizer, PRECISIONS[output_precision],
                           max_shard_size, log, overwrite, flags)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--composer_path", required=True,
                        help="a Composer .pt file, a sharded checkpoint folder, or a save_folder (uses latest)")
    parser.add_argument("--hf_output_path", required=True, help="folder to write")
    parser.add_argument("--output_precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--adapter_only", action="store_true",
                        help="a LoRA run: write the PEFT adapter folder instead of the merged model")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that is not an earlier export of ours: " + OVERWRITE_DOES
                        + "; every other file is kept")


def run(args: argparse.Namespace) -> int:
    convert_composer_to_hf(args.composer_path, args.hf_output_path, args.output_precision, args.max_shard_size,
                          adapter_only=args.adapter_only, overwrite=args.overwrite)
    return 0
