"""`llmfoundry-lite <command> ...`: one entry point; each command lives in the module that owns it.

A command module provides `add_arguments(parser)` and `run(args)`. Only the chosen command's module
is imported, so `llmfoundry-lite generate` does not pay for importing Composer.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from llmfoundry_lite.errors import UserError

COMMANDS = {
    "train": ("llmfoundry_lite.training.command", "train from a YAML config (same schema as llm-foundry)"),
    "eval": ("llmfoundry_lite.eval.command", "evaluate perplexity and ICL tasks from a YAML config"),
    "data-prep": ("llmfoundry_lite.prep.command", "train a tokenizer and convert datasets to MDS shards"),
    "convert": ("llmfoundry_lite.export.command", "convert a checkpoint to a Hugging Face folder or a GGUF file"),
    "generate": ("llmfoundry_lite.inference.generate", "generate completions for prompts"),
    "chat": ("llmfoundry_lite.inference.chat", "chat with a model in the ChatML format"),
    "serve": ("llmfoundry_lite.inference.serve", "serve a model over HTTP (the OpenAI API and the MPT endpoint format)"),
    "quickstart": ("llmfoundry_lite.quickstart", "the whole job, offline, on CPU: data, train, eval, export, generate"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    top = argparse.ArgumentParser(prog="llmfoundry-lite", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", metavar="command")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in COMMANDS:
        top.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"llmfoundry-lite {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return module.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)


def entry(*command: str) -> None:
    """For the thin `scripts/*.py` and `data_prep/*.py` wrappers: run one command (and sub-command,
    e.g. `entry("data-prep", "json")`) with the script's own arguments."""
    sys.exit(main([*command, *sys.argv[1:]]))


if __name__ == "__main__":
    sys.exit(main())
