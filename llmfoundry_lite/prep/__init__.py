"""Data prep (`llmfoundry-lite data-prep`, `data_prep/*.py`): training a tokenizer (`tokenizer`), converting
documents to pretraining MDS shards (`convert`, tokenizing on threads), finetuning
examples and preference pairs to MDS (`finetuning`, `preference`; scoring pairs with a reference model),
and the command (`command`). What the loaders read at run time lives in llmfoundry_lite/data/."""
