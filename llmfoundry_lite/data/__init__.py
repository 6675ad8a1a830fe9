"""Data at run time: tokenizers (`tokenizer`), MDS shards (`mds`), raw records (`sources`), chats and chat
templates (`chat`), finetuning examples and preference pairs (`finetuning`, `preference`), the text
dataset, collators and packing (`collators`), and the `train_loader` / `eval_loader` sections
(`loaders`). Writing data (tokenizer training, MDS conversion) is data prep: llmfoundry_lite/prep/.

Nothing is imported here: import the module you need (`llmfoundry_lite.data.loaders.build_dataloader`,
`llmfoundry_lite.data.tokenizer.build_tokenizer`), so that importing one does not load the others."""
