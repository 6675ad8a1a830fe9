"""`python scripts/convert_composer_to_hf.py ...` == `llmfoundry-lite convert ...` (see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("convert")
