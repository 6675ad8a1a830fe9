"""Training: the Composer side. `llmfoundry_lite.train(cfg, overrides)` (training/entry.py) is the
entry point; objectives/ holds the losses, each a registered entry with its Composer model class."""
