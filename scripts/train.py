"""`composer [-n N] scripts/train.py YAML [key=value ...]`: the llm-foundry habit, same as `llmfoundry-lite train`."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("train")
