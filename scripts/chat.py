"""`python scripts/chat.py ...` == `llmfoundry-lite chat ...` (see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("chat")
