"""`python data_prep/convert_finetuning_dataset.py ...` == `llmfoundry-lite data-prep finetuning ...` (llm-foundry's script name and flags; see `--help`)."""
from llmfoundry_lite.cli import entry

if __name__ == "__main__":
    entry("data-prep", "finetuning")
