"""Shared test setup: offline always, tiny models, small threads."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- data (issue 3): a tiny byte-level BPE every test can share -------------------------------
import pytest


def stdlib_docstrings(limit_chars: int = 200_000) -> str:
    """Text to train tokenizers on and to tokenize: docstrings of standard-library modules."""
    import argparse
    import collections
    import inspect as _inspect
    import json
    import os
    import pathlib
    import textwrap
    parts = []
    for mod in (collections, argparse, json, os, pathlib, textwrap, _inspect):
        for obj in [mod, *vars(mod).values()]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 40:
                parts.append(doc.strip())
    return "\n\n".join(dict.fromkeys(parts))[:limit_chars]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Folder of a byte-level BPE (vocab 400) with <|endoftext|> as eos/pad, <|im_start|>, <|im_end|>
    and a ChatML chat template; load it with `AutoTokenizer.from_pretrained(path)`."""
    from llmfoundry_lite.prep.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("tiny_tokenizer")
    text = root / "train.txt"
    text.write_text(stdlib_docstrings(), encoding="utf-8")
    out = root / "tokenizer"
    train_tokenizer([str(text)], str(out), vocab_size=400, model_max_length=64)
    return str(out)


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir):
    """The tiny tokenizer, loaded as training loads it (`build_tokenizer`)."""
    from llmfoundry_lite.data.tokenizer import build_tokenizer
    return build_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread for a test module: tiny models gain nothing from more, and on a busy
    2-core machine the threads' synchronisation makes them many times slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def release_streaming_shared_memory():
    """Streaming keeps every dataset's shared memory (an open file in /dev/shm per segment, 10-40 per
    dataset) until the process exits, through an atexit cleanup per segment; one pytest session trains
    hundreds of times in process and would run out of file descriptors (20,000 here). After each test
    module, the segments its runs left are released as at exit (one still mapped by a live array stays)."""
    yield
    import atexit
    import gc

    from streaming.base.shared.memory import SharedMemory
    for shm in [o for o in gc.get_objects() if type(o) is SharedMemory]:  # type(): a dead weakproxy raises
        try:
            shm.cleanup()
        except BufferError:  # still exported to a live numpy array: leave it to the atexit cleanup
            continue
        atexit.unregister(shm.cleanup)
        shm.created_shms, shm.opened_shms = [], []


# --- servers (issue 26): moto's S3 and an MLflow tracking server, from .venv-tools (tests/servers.py) --
import servers


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server (a separate process) for the session; yields its endpoint URL, with
    S3_ENDPOINT_URL and test AWS credentials in os.environ (so subprocesses see them too) until the end."""
    with servers.moto_s3(str(tmp_path_factory.mktemp("s3_server"))) as endpoint:
        env = {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
        before = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield endpoint
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def bucket(s3_server):
    """A new, empty bucket on `s3_server`; its name."""
    import uuid

    import boto3
    name = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """An MLflow tracking server (a separate process; SQLite store) for the session; yields its tracking URI."""
    with servers.mlflow_tracking(str(tmp_path_factory.mktemp("mlflow_server"))) as uri:
        yield uri
