"""`llmfoundry-lite data-prep <what> ...`: tokenizers and MDS shards, with llm-foundry's flags.

    data-prep train-tokenizer FILES... --out DIR --vocab_size N [--overwrite]
    data-prep hf         --dataset NAME_OR_BUILDER [--data_files ...] --splits train val --out_root DIR [tokens]
    data-prep json       --path FILE_OR_FOLDER --out_root DIR [--split S] [tokens]
    data-prep text       --input_folder DIR --output_folder DIR [tokens] [--processes N] [--reprocess] [--overwrite]
    data-prep finetuning --dataset NAME_OR_FILE [--data_files ...] --splits train --out_root DIR
                         [--preprocessor dolly|alpaca|module:function] [--tokenizer T --max_seq_len N]
    data-prep preference --dataset NAME_OR_FILE [--data_files ...] --splits train --out_root DIR
                         --tokenizer T --max_seq_len N [--preprocessor hh_rlhf] [--reference_model HF_FOLDER]
                         [--packed]

    data-prep merge      --out_root DIR [--splits S ...] [--realign]

json, text and hf also run in pieces (prep/pieces.py): `--num_shards K --shard_index i` writes piece i
of K into `<split>/piece-i-of-K/` (a job array runs them all), `merge` publishes the split once all are
there; `--spark MASTER [--num_shards K]` runs the pieces as Spark tasks and merges (prep/spark.py).

[tokens] is `--concat_tokens N --tokenizer T [--bos_text ...] [--eos_text ...] [--no_wrap]`; without
it the shards hold raw `text`. `data_prep/*.py` are the same commands under llm-foundry's script names.
`train-tokenizer` and `text` replace only what they wrote themselves (the folder's `.llmfoundry_lite.json`);
another non-empty folder needs `--overwrite`, which replaces the entries of the names they write and keeps
every other file.

`--out_root` (and `text`'s `--output_folder`, `train-tokenizer`'s `--out`) may be an object-store prefix, `s3://bucket/prefix` (MinIO,
R2: `S3_ENDPOINT_URL`), or gs:// / oci://: each split is written locally, then uploaded with its
`index.json` last, so a failed or killed run leaves no `index.json` for a split it did not finish. Before
any work the bucket must be reachable and each split's prefix new or written by the same command (its
`.llmfoundry_lite.json` object), else `--overwrite` (see prep/convert.py `Output`). `--tokenizer` and
`--reference_model` may be object-store folders too (downloaded into the cache first).
"""
from __future__ import annotations

import argparse
import json
import os
import re
from typing import Dict, List, Optional, Union

import torch

from llmfoundry_lite import stores
from llmfoundry_lite.data.finetuning import load_raw_examples, numbered
from llmfoundry_lite.data.mds import check_output_folder
from llmfoundry_lite.data.sources import Counts, Piece, iter_json_records
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.hf_import import load_hf_model
from llmfoundry_lite.opening import local_copy
from llmfoundry_lite.prep import convert, spark
from llmfoundry_lite.prep.convert import TEXT_WRITER, Output, TokenizeSpec
from llmfoundry_lite.prep.finetuning import convert_finetuning
from llmfoundry_lite.prep.pieces import PieceJob, merge, piece_name
from llmfoundry_lite.prep.preference import convert_preference
from llmfoundry_lite.prep.tokenizer import DEFAULT_SPECIAL_TOKENS, train_tokenizer
from llmfoundry_lite.prep.tokenizer import WRITER as TOKENIZER_WRITER


def parse_data_files(values: Optional[List[str]]) -> Union[None, List[str], Dict[str, str]]:
    """`--data_files a.jsonl b.jsonl` (a list) or `--data_files train=a.jsonl val=b.jsonl` (per split)."""
    if not values:
        return None
    pairs = [re.fullmatch(r"(\w+)=(.+)", v) for v in values]
    if all(pairs):
        return {m[1]: m[2] for m in pairs}
    if any(pairs):
        raise UserError(f"--data_files {values}: give either plain paths or split=path for every entry")
    return list(values)


def _json_arg(flag: str, value: Optional[str]) -> Dict:
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{flag} must be a JSON object, e.g. '{{\"model_max_length\": 2048}}' ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise UserError(f"{flag} must be a JSON object, got {type(parsed).__name__}")
    return parsed


# ---- arguments ---------------------------------------------------------------------------------

def _token_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("token rows (omit --concat_tokens and --tokenizer to store raw text)")
    g.add_argument("--concat_tokens", type=int, help="ids per row: documents are concatenated and cut")
    g.add_argument("--tokenizer", help="tokenizer folder, registered name or hub name")
    g.add_argument("--tokenizer_kwargs", help="JSON object for AutoTokenizer.from_pretrained")
    g.add_argument("--bos_text", default="", help="text prepended to every document, e.g. '<|endoftext|>'")
    g.add_argument("--eos_text", default="", help="text appended to every document, e.g. '<|endoftext|>'")
    g.add_argument("--no_wrap", action="store_true", help="drop the rest of a document once a row is cut from it")
    p.add_argument("--compression", default=None, help="shard compression, e.g. zstd (default: none)")


def _piece_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in pieces, on many machines (then `data-prep merge`), or on Spark")
    g.add_argument("--num_shards", type=int, default=None, help="split the input into this many pieces")
    g.add_argument("--shard_index", type=int, default=None, help="write this piece (0 .. --num_shards - 1) only")
    g.add_argument("--spark", default=None, metavar="MASTER",
                   help="run every piece as a Spark task and merge, e.g. local[4] or spark://host:7077 "
                        "(--num_shards default: Spark's parallelism)")
    g.add_argument("--realign", action="store_true", help="with --spark: see `data-prep merge --realign`")
    g.add_argument("--upload_to", default=None, help="with --spark: see `data-prep merge --upload_to`")


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="an object-store --out_root (s3://...): write a split into a prefix holding objects this "
                        "command did not write (" + Output.OVERWRITE_DOES + "; other objects are kept). A local "
                        "split folder must be new or empty")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="what", required=True)

    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE (ChatML template) on local text")
    p.add_argument("inputs", nargs="+", help=".txt/.md files or folders of them")
    p.add_argument("--out", required=True, help="folder to save the tokenizer to")
    p.add_argument("--vocab_size", type=int, default=8192)
    p.add_argument("--special_tokens", nargs="+", help="default: <|endoftext|> <|im_start|> <|im_end|>")
    p.add_argument("--eos_token", default="<|endoftext|>", help="EOS and pad token (one of the special tokens)")
    p.add_argument("--model_max_length", type=int, default=2048)
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--overwrite", action="store_true",
                   help="save into a folder this command did not write (e.g. a model's): it replaces the tokenizer "
                        "files, so a model there gets another vocabulary; other files are kept")

    p = sub.add_parser("hf", help="anything datasets.load_dataset opens -> MDS (convert_dataset_hf.py)")
    p.add_argument("--dataset", required=True, help="a hub name, or a builder (json, text, parquet, csv) with --data_files")
    p.add_argument("--data_subset", default=None, help="the dataset's configuration name, e.g. en for c4")
    p.add_argument("--data_files", nargs="+", help="files for a builder: paths, or split=path per split")
    p.add_argument("--splits", nargs="+", default=["train", "validation"])
    p.add_argument("--out_root", required=True, help="one sub-folder per split is written here")
    p.add_argument("--text_column", default="text")
    p.add_argument("--num_workers", type=int, default=None,
                   help="tokenizing threads, one core each (default: every core this process may use)")
    _token_args(p)
    _piece_args(p)
    _overwrite_arg(p)

    p = sub.add_parser("json", help="a .json/.jsonl file or folder -> MDS (convert_dataset_json.py)")
    p.add_argument("--path", required=True, help="a .json/.jsonl file or a folder of them")
    p.add_argument("--out_root", required=True)
    p.add_argument("--split", default=None, help="write to out_root/<split> (default: out_root itself)")
    p.add_argument("--text_column", default="text")
    p.add_argument("--num_workers", type=int, default=None,
                   help="tokenizing threads, one core each (default: every core this process may use)")
    p.add_argument("--skip_bad_lines", action="store_true", help="skip and count malformed JSONL lines")
    _token_args(p)
    _piece_args(p)
    _overwrite_arg(p)

    p = sub.add_parser("text", help="a folder of .txt files -> MDS, resumable (convert_text_to_mds.py)")
    p.add_argument("--input_folder", required=True)
    p.add_argument("--output_folder", required=True)
    p.add_argument("--processes", type=int, default=None,
                   help="tokenizing threads, one core each (default: every core this process may use)")
    p.add_argument("--files_per_group", type=int, default=None,
                   help="files converted (and resumed) together; default: a quarter of them, or of them / --processes")
    p.add_argument("--reprocess", action="store_true",
                   help="redo a finished or partial conversion (removes only what this command wrote there)")
    p.add_argument("--overwrite", action="store_true",
                   help="convert into a folder this command did not write: its plan.json, index.json, .done and "
                        "group_* entries are replaced, other files are kept")
    _token_args(p)
    _piece_args(p)

    p = sub.add_parser("merge", help="publish a split written in pieces (--num_shards): one index.json over them")
    p.add_argument("--out_root", required=True, help="the --out_root (or text's --output_folder) the pieces went to")
    p.add_argument("--splits", nargs="+", default=None, help="the splits to merge (default: --out_root itself)")
    p.add_argument("--realign", action="store_true",
                   help="rewrite every row in input order: byte-identical to a one-machine run (one more pass "
                        "over the tokens, no tokenizing; uncompressed pieces)")
    p.add_argument("--upload_to", default=None, metavar="URI",
                   help="then publish each merged split to this object-store prefix (s3://..., its index.json last)")
    p.add_argument("--overwrite", action="store_true",
                   help="--upload_to a prefix holding objects this command did not write (" + Output.OVERWRITE_DOES + ")")

    p = sub.add_parser("finetuning", help="prompt/response or chat examples -> MDS (convert_finetuning_dataset.py)")
    _source_args(p)
    p.add_argument("--preprocessor", default=None, help="dolly, alpaca, or module:function")
    p.add_argument("--tokenizer", default=None, help="pre-tokenize (then over-long examples are counted here)")
    p.add_argument("--tokenizer_kwargs", help="JSON object for AutoTokenizer.from_pretrained")
    p.add_argument("--max_seq_len", type=int, default=None, help="with --tokenizer: examples are cut to it")
    p.add_argument("--target_prompts", default="none", help="none | all | length>=N")
    p.add_argument("--target_responses", default="last", help="last | all")
    p.add_argument("--chat_template", default=None, help="chatml | mpt-7b-chat | a Jinja string (default: the tokenizer's)")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="skip and count malformed JSONL lines (local files) and invalid examples (e.g. bad chats)")
    p.add_argument("--compression", default=None)

    p = sub.add_parser("preference", help="preference pairs (prompt, chosen, rejected) -> tokenized MDS for DPO")
    _source_args(p)
    p.add_argument("--preprocessor", default=None, help="hh_rlhf, or module:function")
    p.add_argument("--tokenizer", required=True, help="the tokenizer of the model to be trained")
    p.add_argument("--tokenizer_kwargs", help="JSON object for AutoTokenizer.from_pretrained")
    p.add_argument("--max_seq_len", type=int, required=True,
                   help="a longer pair keeps the end of its prompt; one whose reply alone is longer is dropped")
    p.add_argument("--chat_template", default=None, help="chatml | mpt-7b-chat | a Jinja string (default: the tokenizer's)")
    p.add_argument("--reference_model", default=None,
                   help="HF folder of the model DPO starts from: store its log-probabilities of each reply "
                        "(training then runs without a reference model)")
    p.add_argument("--packed", action="store_true",
                   help="cut prompts so that both sides of a pair fit one row together (for packing_ratio)")
    p.add_argument("--batch_size", type=int, default=8, help="pairs per reference-model forward")
    p.add_argument("--skip_bad_lines", action="store_true",
                   help="skip and count malformed JSONL lines (local files) and invalid pairs")
    p.add_argument("--compression", default=None)


def _source_args(p: argparse.ArgumentParser) -> None:
    """Where finetuning examples or preference pairs come from, and the splits written."""
    p.add_argument("--dataset", required=True,
                   help="a local .json/.jsonl file or folder, a hub name, or a builder (json, csv, parquet) with --data_files")
    p.add_argument("--data_subset", default=None)
    p.add_argument("--data_files", nargs="+", help="files for a builder: paths, or split=path per split")
    p.add_argument("--splits", nargs="+", default=["train"])
    p.add_argument("--out_root", required=True, help="one sub-folder per split is written here")
    _overwrite_arg(p)


# ---- running -----------------------------------------------------------------------------------

def _spec(args):
    return TokenizeSpec(tokenizer=args.tokenizer, tokenizer_kwargs=_json_arg("--tokenizer_kwargs", args.tokenizer_kwargs),
                        concat_tokens=args.concat_tokens, bos_text=args.bos_text, eos_text=args.eos_text,
                        wrap=not args.no_wrap)


def run(args: argparse.Namespace) -> int:
    for flag in ("tokenizer", "reference_model"):  # in an object store: downloaded into the cache first
        if getattr(args, flag, None):
            setattr(args, flag, local_copy(getattr(args, flag), f"--{flag}"))
    if args.what == "train-tokenizer":
        output = Output(args.out, [None], TOKENIZER_WRITER, args.overwrite, "--out")  # s3://: staged, uploaded
        tok = train_tokenizer(args.inputs, output.local(None), args.vocab_size,
                              args.special_tokens or DEFAULT_SPECIAL_TOKENS, args.eos_token, args.model_max_length,
                              args.min_frequency, args.overwrite and not output.remote)
        print(f"tokenizer: {len(tok)} tokens (eos {tok.eos_token!r}, ChatML template) -> {output.publish(None)}")
    elif args.what == "merge":
        targets = {split: _upload_target(split, args) for split in args.splits or [None]}
        for split, target in targets.items():
            _merge(os.path.join(args.out_root, split) if split else args.out_root, target, args)
    elif args.what in ("json", "text", "hf") and (
            args.realign or (args.num_shards, args.shard_index, args.spark, args.upload_to) != (None,) * 4):
        _in_pieces(args)
    elif args.what == "hf":
        summaries = convert.convert_hf(args.dataset, args.out_root, args.splits, _spec(args), args.data_subset,
                                       parse_data_files(args.data_files), args.text_column, args.compression,
                                       args.num_workers, args.overwrite)
        for split, summary in summaries.items():
            print(f"{os.path.join(args.out_root, split)}: {summary}")
    elif args.what == "json":
        summary = convert.convert_json(args.path, args.out_root, _spec(args), args.split, args.text_column,
                                       args.compression, args.num_workers, args.skip_bad_lines, args.overwrite)
        print(f"{os.path.join(args.out_root, args.split or '')}: {summary}")
    elif args.what == "text":  # an object store: converted (and resumed) in the local staging folder
        output = Output(args.output_folder, [None], TEXT_WRITER, args.overwrite, "--output_folder", resumable=True)
        summary = convert.convert_text(args.input_folder, output.local(None), _spec(args), args.compression,
                                       args.processes, args.files_per_group, args.reprocess,
                                       args.overwrite and not output.remote)
        print(f"{output.publish(None)}: {summary}")
    elif args.what == "finetuning":
        _finetuning(args)
    else:
        _preference(args)
    return 0


def _upload_target(split: Optional[str], args: argparse.Namespace) -> Optional[str]:
    """Where --upload_to publishes `split` (the prefix checked now, before any work), or None."""
    if not args.upload_to:
        return None
    if not stores.is_remote(args.upload_to):
        raise UserError(f"--upload_to {args.upload_to}: not an object-store URI (s3://, gs://, oci://)")
    target = stores.join(args.upload_to, split) if split else args.upload_to
    stores.claim_prefix(target, "data-prep merge", "--upload_to", args.overwrite, overwrite_does=Output.OVERWRITE_DOES)
    return target


def _merge(folder: str, target: Optional[str], args: argparse.Namespace) -> None:
    """Merge the pieces in `folder`; publish the split at `target` (an object-store prefix) when given."""
    if target and os.path.exists(os.path.join(folder, "index.json")):  # merged, its upload interrupted: upload
        summary = "merged before; uploaded now"
    else:
        summary = merge(folder, args.realign)
    if target:
        stores.publish_folder(folder, target, "data-prep merge", "--upload_to", args.overwrite, last=["index.json"],
                              overwrite_does=Output.OVERWRITE_DOES)
    print(f"{target or folder}: {summary}")


def _in_pieces(args: argparse.Namespace) -> None:
    """json/text/hf with --num_shards/--shard_index (one piece) or --spark (all pieces, then the merge)."""
    if (args.realign or args.upload_to) and not args.spark:
        raise UserError("--realign and --upload_to belong to the merge: pass them to `data-prep merge` (or run with --spark)")
    if args.shard_index is not None and args.num_shards is None:
        raise UserError("--shard_index needs --num_shards")
    if (args.shard_index is None) == (args.spark is None):
        raise UserError("--num_shards goes with --shard_index (write one piece here) or --spark (run every piece on "
                        "Spark), one of them")
    out = args.output_folder if args.what == "text" else args.out_root
    if stores.is_remote(out):
        raise UserError(f"{out}: pieces are written to a folder all of them see (a shared file system): "
                        "write them there, then publish the split with `data-prep merge --upload_to URI`")
    out = os.path.abspath(out)  # the same on every executor
    if args.what == "json":
        jobs = [PieceJob("json", os.path.abspath(args.path), os.path.join(out, args.split or ""), _spec(args), args.num_shards or 0,
                         args.text_column, args.compression, args.skip_bad_lines, num_workers=args.num_workers)]
    elif args.what == "text":
        jobs = [PieceJob("text", os.path.abspath(args.input_folder), out, _spec(args), args.num_shards or 0,
                         compression=args.compression, num_workers=args.processes, flag="--output_folder")]
    else:
        hf = {"name": args.data_subset, "data_files": parse_data_files(args.data_files)}
        jobs = [PieceJob("hf", args.dataset, os.path.join(out, split), _spec(args), args.num_shards or 0,
                         args.text_column, args.compression, hf={**hf, "split": split}, num_workers=args.num_workers)
                for split in args.splits]
    targets = [_upload_target(job.hf.get("split") or getattr(args, "split", None), args) for job in jobs]
    for job, target in zip(jobs, targets, strict=True):
        if args.spark:
            _merge(spark.run_pieces(job, args.spark).split_dir, target, args)
        else:
            print(f"{job.split_dir}/{piece_name(Piece(args.shard_index, job.count))}: {job.run(args.shard_index)}")


def _split_sources(args: argparse.Namespace):
    """(Output, [(split, `(where, row)` iterator, Counts of lines skipped by it)] per split of --dataset),
    after checking the flags and that every output folder (or prefix) may be written; the rows are read
    when iterated. Write a split to `output.local(split)`, then `output.publish(split)`."""
    local = os.path.exists(args.dataset)
    if local and args.data_files:
        raise UserError(f"--data_files goes with a builder or hub name; {args.dataset} is already a local path")
    if local and len(args.splits) != 1:
        raise UserError(f"--dataset {args.dataset} is one local file or folder: name one split with --splits")
    output = Output(args.out_root, args.splits, f"data-prep {args.what}", args.overwrite)
    for split in args.splits:
        check_output_folder(output.local(split))
    return output, [(split, *_rows(args, split, local)) for split in args.splits]


def _rows(args: argparse.Namespace, split: str, local: bool):
    skipped = Counts()
    if local:  # our own reader: errors name file and line, --skip_bad_lines counts what it skips
        return iter_json_records(args.dataset, skipped, args.skip_bad_lines), skipped
    kwargs = {"name": args.data_subset, "data_files": parse_data_files(args.data_files)}

    def rows():  # opened when the split's turn comes
        yield from numbered(load_raw_examples(args.dataset, split, kwargs))
    return rows(), skipped


def _finetuning(args: argparse.Namespace) -> None:
    if args.max_seq_len is not None and args.tokenizer is None:
        raise UserError("--max_seq_len needs --tokenizer (only pre-tokenized examples can be measured)")
    output, sources = _split_sources(args)
    tokenizer = build_tokenizer(args.tokenizer, _json_arg("--tokenizer_kwargs", args.tokenizer_kwargs)) if args.tokenizer else None
    for split, examples, skipped in sources:
        stats = convert_finetuning(examples, output.local(split), tokenizer, args.max_seq_len, args.preprocessor,
                                   args.target_prompts, args.target_responses, args.chat_template, args.compression,
                                   args.skip_bad_lines)
        print(f"{output.publish(split)}: {Counts({**stats, **skipped})}")


def _preference(args: argparse.Namespace) -> None:
    output, sources = _split_sources(args)
    tokenizer = build_tokenizer(args.tokenizer, _json_arg("--tokenizer_kwargs", args.tokenizer_kwargs))
    reference = _reference_model(args.reference_model, tokenizer) if args.reference_model else None
    for split, pairs, skipped in sources:
        stats = convert_preference(pairs, output.local(split), tokenizer, args.max_seq_len, args.preprocessor,
                                   args.chat_template, args.compression, args.skip_bad_lines, reference,
                                   args.batch_size, args.packed)
        print(f"{output.publish(split)}: {Counts({**stats, **skipped})}")


def _reference_model(path: str, tokenizer):
    """`--reference_model`: an HF MPT folder (or hub name while online), fp32, on the GPU when there is
    one, opened by export/'s loader (weights checked, MosaicML kernels mapped) rather than a second way;
    `convert_preference` itself takes the model."""
    model = load_hf_model(path).float().to("cuda" if torch.cuda.is_available() else "cpu")
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"--tokenizer has {len(tokenizer)} tokens but --reference_model {path} only "
                        f"{model.config.vocab_size}: give the tokenizer of the model DPO starts from")
    return model.eval()
