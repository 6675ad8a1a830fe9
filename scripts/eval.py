"""Evaluate models on perplexity and ICL tasks: `python scripts/eval.py YAML [key=value ...]`."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("eval")
