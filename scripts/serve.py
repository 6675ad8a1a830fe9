"""`python scripts/serve.py ...` == `llmfoundry-lite serve ...` (see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("serve")
