"""`python scripts/generate.py ...` == `llmfoundry-lite generate ...` (see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("generate")
