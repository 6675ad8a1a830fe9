"""Writes the Composer checkpoints the export tests convert (run as a script, in its own process,
because a sharded checkpoint needs a torch.distributed process group).

    python tests/export_checkpoints.py OUT_DIR TOKENIZER_DIR

OUT_DIR/full/latest-rank0.pt (one file) and OUT_DIR/sharded/ep0-ba3/ (FSDP2, DCP) of the same tiny
MPT trained 3 batches with AdamW (so the checkpoints hold optimizer state too), each with
OUT_DIR/<kind>-weights.pt: the trained weights, for comparison. The model is the training code's
`ComposerMPTCausalLM` (a Composer `HuggingFaceModel` around our `MPTForCausalLM`); the data is random
tokens fed straight to Composer's Trainer, so the test needs no dataset.
"""
import os
import socket
import sys

import torch


def main(out: str, tokenizer_dir: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from composer import Trainer
    from composer.optim import DecoupledAdamW
    from composer.utils.parallelism import FSDP2Config
    from transformers import AutoTokenizer

    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    from llmfoundry_lite.training.objectives.crossentropy import ComposerMPTCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for kind, extra in (("full", {}), ("sharded", {"parallelism_config": {"fsdp": FSDP2Config()}})):
        torch.manual_seed(0)
        model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                         vocab_size=len(tokenizer)))
        ids = torch.randint(0, len(tokenizer), (12, 16))
        data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
        trainer = Trainer(model=ComposerMPTCausalLM(model, tokenizer),
                          train_dataloader=torch.utils.data.DataLoader(data, batch_size=4),
                          optimizers=DecoupledAdamW(model.parameters(), lr=1e-2), max_duration="3ba",
                          save_folder=os.path.join(out, kind), save_interval="3ba", device="cpu",
                          progress_bar=False, log_to_console=False, **extra)
        trainer.fit()
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in model.state_dict().items()}
        torch.save(weights, os.path.join(out, f"{kind}-weights.pt"))
        trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
