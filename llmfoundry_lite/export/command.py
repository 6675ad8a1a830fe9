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

Either path may be in an object store (`s3://bucket/prefix`; MinIO, R2: `S3_ENDPOINT_URL`): the
checkpoint (a `.pt` object, a sharded checkpoint's prefix, or a save_folder's, whose pointer names its
latest) is downloaded into the cache first and read like a local one; the HF folder is written into a
local staging folder and uploaded with `config.json` last, under the same rule for what it may replace
(the prefix's `.llmfoundry_lite.json` object). Both are reached with short timeouts before any work.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
from typing import Iterator, Tuple

from llmfoundry_lite import stores
from llmfoundry_lite.assembly.weights import model_from_weights
from llmfoundry_lite.errors import StoreError, UserError
from llmfoundry_lite.export.composer_checkpoint import fetch_checkpoint, read_composer_checkpoint
from llmfoundry_lite.export.hf_export import (
    OVERWRITE_DOES,
    PRECISIONS,
    WRITER,
    _other_weights,
    check_export_target,
    write_hf_folder,
    write_lora_folder,
)


def check_remote_export(uri: str, overwrite: bool, flags: Tuple[str, str]) -> None:
    """Before any work: the store of the prefix `uri` is reachable and an export may write there (new,
    an earlier export of ours, or `overwrite`); nothing is written."""
    problem = stores.probe(uri, "bucket")
    if problem:
        raise StoreError(f"{flags[0]} {problem}")
    stores.claim_prefix(uri, WRITER, flags[0], overwrite, overwrite_flag=flags[1], overwrite_does=OVERWRITE_DOES)


@contextlib.contextmanager
def export_target(out: str, overwrite: bool, flags: Tuple[str, str], weights: bool = True,
                  log=print) -> Iterator[str]:
    """The folder an export writes to: `out` itself (checked by check_export_target), or for an
    object-store prefix a local staging folder, uploaded when the block succeeds with `config.json` (an
    adapter folder's `adapter_config.json`) last, so a reader that waits for it never sees half a folder.
    Objects of ours there that the export does not write again are removed (with `weights`, other weight
    files too, as a local export removes them); a prefix of someone else's is refused unless `overwrite`."""
    if not stores.is_remote(out):
        check_export_target(out, overwrite, flags)
        yield out
        return
    check_remote_export(out, overwrite, flags)
    # only ever a copy on its way to the bucket; not under "staging": an hf_checkpointer folder is often
    # inside the run's save_folder, whose staging folder training empties and fills itself
    staging = stores.local_mirror(out, "exports")
    shutil.rmtree(staging, ignore_errors=True)
    yield staging
    uploaded = stores.publish_folder(staging, out, WRITER, flags[0], overwrite, ("config.json", "adapter_config.json"),
                                     _other_weights if weights else None, flags[1], OVERWRITE_DOES)
    shutil.rmtree(staging, ignore_errors=True)
    log(f"uploaded {len(uploaded)} files to {out}")


def fetch_composer_path(path: str, flag: str = "--composer_path") -> str:
    """A local path of the checkpoint `path` names (one in an object store is downloaded, after a quick
    check that it is there)."""
    if stores.is_remote(path):
        problem = stores.probe(path, "folder")
        if problem:
            raise StoreError(f"{flag} {problem}")
    return fetch_checkpoint(path)


def convert_composer_to_hf(composer_path: str, hf_output_path: str, output_precision: str = "fp32",
                           max_shard_size="5GB", log=print, adapter_only: bool = False, overwrite: bool = False) -> str:
    """Write the HF folder of a full (.pt) or sharded Composer checkpoint (a LoRA run's: merged, or its
    adapter folder with `adapter_only`); returns the folder. A folder holding files that are not an
    earlier export of ours is refused before any work, unless `overwrite`."""
    flags = ("--hf_output_path", "--overwrite")
    if stores.is_remote(hf_output_path):
        check_remote_export(hf_output_path, overwrite, flags)
    else:
        check_export_target(hf_output_path, overwrite, flags)
    config, tokenizer, weights, lora = read_composer_checkpoint(fetch_composer_path(composer_path))
    if adapter_only and lora is None:
        raise UserError(f"--adapter_only: {composer_path} is not a LoRA run's checkpoint (it has no adapters); "
                        "drop --adapter_only to export the model")
    with export_target(hf_output_path, overwrite, flags, weights=not adapter_only, log=log) as out:
        if lora is not None:
            model = model_from_weights(config, weights, composer_path, lora)
            write_lora_folder(model, out, tokenizer, PRECISIONS[output_precision], adapter_only,
                              max_shard_size, log, overwrite, flags)
        else:
            write_hf_folder(config, weights, out, tokenizer, PRECISIONS[output_precision],
                            max_shard_size, log, overwrite, flags)
    return hf_output_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--composer_path", required=True,
                        help="a Composer .pt file, a sharded checkpoint folder, or a save_folder (uses latest); "
                             "local or s3://bucket/path")
    parser.add_argument("--hf_output_path", required=True, help="folder to write (local or s3://bucket/prefix)")
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
