"""What an object store costs a training run: tokens/s of a 1-process run streaming its MDS data from an
S3-compatible server (moto's, a separate process on loopback, from .venv-tools) against the same run
reading a local folder, and the time a run spends on its checkpoints when `save_folder` is `s3://`
(written locally, then uploaded in order, pointer last) against a local `save_folder`; one JSON line.

    python benchmarks/bench_store_training.py [--batches 40] [--rounds 2] [--d_model 128]

After a warm-up run, each round runs four variants in turn (local data, s3 data, local data with
checkpoints to a local folder, local data with checkpoints to s3), each
with a fresh streaming cache, so every s3 run downloads its shards. Figures are medians over rounds:
tokens/s (trained tokens / wall time of `train()`), and per checkpoint the extra seconds of a run that
saves every `--save_every` batches over the same run without checkpoints, with the checkpoint's size.
Loopback has no network latency: this measures the client-side cost (requests, copies, hashing), the
floor of what a remote store adds.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.join(os.path.dirname(HERE), "tests")]
import boto3  # noqa: E402
import torch  # noqa: E402

from llmfoundry_lite import stores  # noqa: E402

from servers import moto_s3  # noqa: E402  (tests/servers.py: the server process the tests use)
from train_utils import ROW, run, tiny_overrides, write_copy_task  # noqa: E402


def timed(overrides) -> float:
    start = time.perf_counter()
    run(*overrides)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--save_every", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--d_model", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp, moto_s3(tmp) as endpoint:
        os.environ.update({"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "LLMFOUNDRY_LITE_CACHE": os.path.join(tmp, "cache")})
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        data = write_copy_task(os.path.join(tmp, "data"), n_train=args.batches * args.batch_size, n_val=16)
        stores.upload_folder(data, f"s3://{bucket}/data")
        from conftest import stdlib_docstrings  # the tests' tiny tokenizer, trained the same way

        from llmfoundry_lite.prep.tokenizer import train_tokenizer
        with open(os.path.join(tmp, "text.txt"), "w") as f:
            f.write(stdlib_docstrings())
        tokenizer = os.path.join(tmp, "tokenizer")
        train_tokenizer([os.path.join(tmp, "text.txt")], tokenizer, vocab_size=400, model_max_length=64)

        def overrides(name, data_from, save_to):
            values = {"max_duration": f"{args.batches}ba", "global_train_batch_size": args.batch_size,
                      "model.d_model": args.d_model, "model.n_heads": 4, "run_name": name,
                      "save_interval": f"{args.save_every}ba", "save_num_checkpoints_to_keep": 1}
            if data_from == "s3":  # into a fresh local cache
                values["train_loader.dataset.remote"] = f"s3://{bucket}/data"
                values["train_loader.dataset.local"] = os.path.join(tmp, "stream", name)
            if save_to:
                values["save_folder"] = (f"s3://{bucket}/ckpt/{name}" if save_to == "s3"
                                         else os.path.join(tmp, "ckpt", name))
            return tiny_overrides(data, tokenizer, **values)

        timed(overrides("warmup", "local", None))  # first-run costs (imports, caches) counted in no variant
        times = {k: [] for k in ("local", "s3", "local+ckpt", "s3+ckpt")}
        for r in range(args.rounds):
            times["local"].append(timed(overrides(f"a{r}", "local", None)))
            times["s3"].append(timed(overrides(f"b{r}", "s3", None)))
            times["local+ckpt"].append(timed(overrides(f"c{r}", "local", "local")))
            times["s3+ckpt"].append(timed(overrides(f"d{r}", "local", "s3")))
        ckpt_dir = os.path.join(tmp, "ckpt", f"c{args.rounds - 1}")
        size = max(os.path.getsize(os.path.join(ckpt_dir, n)) for n in os.listdir(ckpt_dir) if n.endswith(".pt"))
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.batches * args.batch_size * ROW
    n_ckpt = args.batches // args.save_every
    print(json.dumps({
        "batches": args.batches, "tokens": tokens, "rounds": args.rounds, "d_model": args.d_model,
        "tokens_per_s": {"local_data": round(tokens / med["local"]), "s3_data": round(tokens / med["s3"])},
        "s3_data_over_local": round(med["local"] / med["s3"], 3),
        "checkpoint_mb": round(size / 2**20, 2), "checkpoints": n_ckpt,
        "seconds_per_checkpoint": {"local": round((med["local+ckpt"] - med["local"]) / n_ckpt, 3),
                                   "s3": round((med["s3+ckpt"] - med["local"]) / n_ckpt, 3)},
        "upload_mb_per_s": round(size / 2**20 / max((med["s3+ckpt"] - med["local+ckpt"]) / n_ckpt, 1e-3), 1),
    }))


if __name__ == "__main__":
    main()
