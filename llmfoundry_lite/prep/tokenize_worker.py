"""The worker processes of `write_mds` (prep/convert.py, `num_workers > 1`): each holds a
`tokenizers.Tokenizer` and turns batches of documents into token ids. A module of its own so that a
spawned worker imports only numpy and `tokenizers`, not transformers, torch or streaming."""
from __future__ import annotations

import os
from typing import List

import numpy as np
from tokenizers import Tokenizer

_worker_tok = None  # this worker's tokenizer, set by `init_worker`


def init_worker(tokenizer_json: str) -> None:
    global _worker_tok
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _worker_tok = Tokenizer.from_str(tokenizer_json)


def tokenize(texts: List[str]) -> List[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int64) for e in _worker_tok.encode_batch(texts, add_special_tokens=False)]
