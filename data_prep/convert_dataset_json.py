"""`python data_prep/convert_dataset_json.py ...` == `llmfoundry-lite data-prep json ...` (llm-foundry's script name and flags; see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("data-prep", "json")
