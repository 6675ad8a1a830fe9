"""`python data_prep/convert_text_to_mds.py ...` == `llmfoundry-lite data-prep text ...` (llm-foundry's script name and flags; see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("data-prep", "text")
