"""`llmfoundry-lite convert` / `scripts/convert_composer_to_hf.py`: Composer checkpoint -> HF folder.

    llmfoundry-lite convert --composer_path run/checkpoints/latest-rank0.pt --hf_output_path out/hf \\
        --output_precision bf16 [--max_shard_size 5GB]

Works on CPU with no process group; tensors stream from the checkpoint into the safetensors
shards one at a time, and the optimizer state is never read.
"""
from __future__ import annotations

import argparse

from llmfoundry_lite.export.composer_checkpoint import open_composer_checkpoint
from llmfoundry_lite.export.hf_export import PRECISIONS, write_hf_folder
from llmfoundry_lite.files import check_folder_path


def convert_composer_to_hf(composer_path: str, hf_output_path: str, output_precision: str = "fp32",
                           max_shard_size="5GB", log=print) -> str:
    """Write the HF folder of a full (.pt) or sharded Composer checkpoint; returns the folder."""
    check_folder_path(hf_output_path, "--hf_output_path")
    config, tokenizer, weights = open_composer_checkpoint(composer_path)
    return write_hf_folder(config, weights, hf_output_path, tokenizer, PRECISIONS[output_precision],
                           max_shard_size, log)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--composer_path", required=True,
                        help="a Composer .pt file, a sharded checkpoint folder, or a save_folder (uses latest)")
    parser.add_argument("--hf_output_path", required=True, help="folder to write")
    parser.add_argument("--output_precision", default="fp32", choices=sorted(PRECISIONS))
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")


def run(args: argparse.Namespace) -> int:
    convert_composer_to_hf(args.composer_path, args.hf_output_path, args.output_precision, args.max_shard_size)
    return 0
