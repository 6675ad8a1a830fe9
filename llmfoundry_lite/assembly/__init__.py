"""Assembly: a runnable model from a config and weights (`weights.model_from_weights`, once for every
reader), LoRA adapters through peft (`lora`), and placing a model on devices (`sharding`). Below the
formats (export/) that read the weights and above the plain model (models/)."""
