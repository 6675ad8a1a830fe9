"""Every shim over a library's version differences or internals, in one place, one module per library:

- `hf`: transformers 4 vs 5 (config keys, stock MptConfig's types, the KV-cache keyword);
- `torch`: torch 2.7 vs newer, and torch internals we reach into (FSDP2, activation checkpointing);
- `composer`: Composer 0.32's private helpers and the places we patch it (and wandb's `Run`, which
  Composer's logger calls by a name wandb dropped);
- `moved`: the import paths that moved in the redesign (deprecated aliases, one release).

Each shim says which version needs it and how we would know it can go. The modules import only the
library they shim, so a command pays only for the libraries it uses.
"""
