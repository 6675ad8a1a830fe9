"""`llmfoundry-lite convert` / `scripts/convert_composer_to_hf.py`: a Composer checkpoint (or an HF folder)
-> an HF folder, or one GGUF file for llama.cpp.

    llmfoundry-lite convert --composer_path run/checkpoints/latest-rank0.pt --hf_output_path out/hf \\
        --output_precision bf16 [--max_shard_size 5GB] [--adapter_only] [--overwrite]
    llmfoundry-lite convert --composer_path run/checkpoints --gguf_output_path out/model.gguf \\
        --output_precision q8_0            # or fp16 (default for GGUF), bf16, fp32
    llmfoundry-lite convert --hf_path out/hf --gguf_output_path out/model.gguf   # from an HF folder

The input is `--composer_path` (a checkpoint) or `--hf_path` (an HF MPT folder); `--tokenizer` replaces
the tokenizer stored with it. A GGUF file (gguf_export.py) holds the tokenizer; a model llama.cpp's MPT
cannot represent is refused naming the keys, and an existing file is replaced only when this command
wrote it (its header says so) or with `--overwrite`.

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
import os
import shutil
from typing import Iterator, Optional, Tuple

from llmfoundry_lite import stores
from llmfoundry_lite.assembly.lora import merged
from llmfoundry_lite.assembly.weights import model_from_weights
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import StoreError, UserError
from llmfoundry_lite.export import gguf_export
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
from llmfoundry_lite.export.hf_import import FolderWeights, load_hf_config


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


def read_model(composer_path: Optional[str] = None, hf_path: Optional[str] = None, tokenizer: Optional[str] = None):
    """(MPTConfig, weights by HF name, tokenizer or None, where from) of a Composer checkpoint or an HF
    folder (local or in an object store); a LoRA run's adapters are merged; `tokenizer` replaces the
    stored one. Weights of a plain model are read lazily, one tensor when asked for."""
    if hf_path:
        folder = fetch_composer_path(hf_path, "--hf_path")
        _, config = load_hf_config(folder)
        weights, source = FolderWeights(folder), hf_path
        has_tokenizer = any(os.path.isfile(os.path.join(folder, n)) for n in ("tokenizer.json", "tokenizer_config.json"))
        stored = build_tokenizer(folder) if has_tokenizer and not tokenizer else None
    else:
        config, stored, weights, lora = read_composer_checkpoint(fetch_composer_path(composer_path))
        if lora is not None:
            weights = merged(model_from_weights(config, weights, composer_path, lora)).state_dict()
        source = composer_path
    return config, weights, build_tokenizer(tokenizer) if tokenizer else stored, source


def convert_to_gguf(gguf_output_path: str, composer_path: Optional[str] = None, hf_path: Optional[str] = None,
                    precision: str = "fp16", tokenizer: Optional[str] = None, overwrite: bool = False,
                    log=print) -> str:
    """Write one GGUF file (llama.cpp) of a Composer checkpoint or an HF folder; returns its path. The
    target is checked before any work: a new file, a GGUF this command wrote, or `overwrite` (an object
    in a store: new, or `overwrite`)."""
    flags = ("--gguf_output_path", "--overwrite")
    remote = stores.is_remote(gguf_output_path)
    if remote:
        problem = stores.probe(gguf_output_path, "bucket")
        if problem:
            raise StoreError(f"{flags[0]} {problem}")
        if stores.exists(gguf_output_path) and not overwrite:
            raise UserError(f"{flags[0]} {gguf_output_path} exists; nothing was changed. Choose a new name, or "
                            f"pass {flags[1]} to replace it")
    else:
        gguf_export.check_gguf_target(gguf_output_path, overwrite, flags)
    config, weights, tok, source = read_model(composer_path, hf_path, tokenizer)
    log(f"converting {source}")
    if not remote:
        return gguf_export.write_gguf(config, weights, tok, gguf_output_path, precision, log)
    staged = os.path.join(stores.local_mirror(gguf_output_path, "exports"), os.path.basename(gguf_output_path))
    try:
        gguf_export.write_gguf(config, weights, tok, staged, precision, log)
        stores.upload(staged, gguf_output_path)
    finally:  # only ever a copy on its way to the bucket
        if os.path.exists(staged):
            os.remove(staged)
    log(f"uploaded to {gguf_output_path}")
    return gguf_output_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--composer_path",
                        help="a Composer .pt file, a sharded checkpoint folder, or a save_folder (uses latest); "
                             "local or s3://bucket/path")
    source.add_argument("--hf_path", help="GGUF: an HF MPT model folder to convert (local or s3://bucket/prefix)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--hf_output_path", help="HF folder to write (local or s3://bucket/prefix)")
    target.add_argument("--gguf_output_path",
                        help="GGUF file to write for llama.cpp / Ollama (local or s3://bucket/key.gguf)")
    parser.add_argument("--output_precision", default=None, choices=sorted(gguf_export.PRECISIONS),
                        help="weights: fp32, fp16, bf16, or for GGUF also q8_0 (default: fp32 for an HF folder, "
                             "fp16 for GGUF)")
    parser.add_argument("--tokenizer", default=None,
                        help="GGUF: the tokenizer folder or name to store instead of the model's")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    parser.add_argument("--adapter_only", action="store_true",
                        help="a LoRA run: write the PEFT adapter folder instead of the merged model")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a folder that is not an earlier export of ours: " + OVERWRITE_DOES
                        + "; every other file is kept (GGUF: replace a file this command did not write)")


def run(args: argparse.Namespace) -> int:
    if args.gguf_output_path:
        if args.adapter_only:
            raise UserError("--adapter_only writes a PEFT adapter folder (with --hf_output_path); a GGUF file "
                            "holds the whole model with the adapters merged: drop --adapter_only")
        convert_to_gguf(args.gguf_output_path, args.composer_path, args.hf_path, args.output_precision or "fp16",
                        args.tokenizer, args.overwrite)
        return 0
    if args.output_precision == "q8_0":
        raise UserError("--output_precision q8_0 is a GGUF type; an HF folder takes fp32, fp16 or bf16")
    for flag, value in (("--hf_path", args.hf_path), ("--tokenizer", args.tokenizer)):
        if value:
            raise UserError(f"{flag} is for --gguf_output_path; an HF folder is exported from --composer_path "
                            "with the tokenizer stored in the checkpoint")
    convert_composer_to_hf(args.composer_path, args.hf_output_path, args.output_precision or "fp32",
                           args.max_shard_size, adapter_only=args.adapter_only, overwrite=args.overwrite)
    return 0
