"""Object stores (issue 26): peak memory of `convert` from `s3://` vs from a local folder, and upload /
download time vs object size, against a local S3 server (moto's, from .venv-tools, as the tests use).

    .venv/bin/python benchmarks/bench_store_convert.py [--out benchmarks/results/object_stores.md]

A sharded (DCP) Composer-layout checkpoint of a random MPT (d_model 512, 8 layers, vocab 50368: 51M
parameters, ~194 MiB of fp32 weights, written by 4 writer threads into 4 files) is uploaded to the
server, then converted to an HF folder twice, each in a fresh process that samples its own
/proc/self/status every 5 ms: from the local folder, and from its `s3://` prefix (download into the
cache, then the same conversion). Memory is the growth over the process just before converting (all
modules imported): anon = private memory, rss = anon + file pages read. The seconds of the `s3://`
run include the download. Then `stores.upload` / `stores.download` of 16, 64 and 256 MiB files.
Prints one JSON line per measurement; `--out FILE` also appends Markdown rows to FILE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from bench_export_memory import CHILD  # noqa: E402  (the same measured conversion, in a child process)

import servers  # noqa: E402  (tests/servers.py: starts moto's server from .venv-tools)

SHAPE = dict(d_model=512, n_heads=8, n_layers=8, vocab_size=50368)
SIZES_MIB = (16, 64, 256)



def write_sharded_checkpoint(folder: str) -> dict:
    """A DCP folder with Composer's layout (state.model.model.*, the HF config under
    state.integrations.huggingface), as `llmfoundry-lite train` with FSDP writes it."""
    import torch.distributed.checkpoint as dcp

    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    config = MPTConfig(**SHAPE, max_seq_len=2048, init_device="meta")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MPTForCausalLM(config).state_dict().items()}
    model = {f"model.{k}": torch.randn(s) for k, s in shapes.items() if k != "lm_head.weight"}
    content = {**config.to_dict(), "init_device": "cpu"}
    state = {"state": {"model": model, "integrations": {"huggingface": {"model": {"config": {"content": content}}}}}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, thread_count=4), no_dist=True)
    return {"weights_bytes": sum(t.numel() * 4 for t in model.values()),
            "checkpoint_bytes": sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)),
            "files": len(os.listdir(folder))}


def convert_in_child(source: str, out: str, env: dict) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, source, out, "100MB", "fp32"], check=True, capture_output=True, text=True,
                            env=env, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="append Markdown rows to this file")
    args = parser.parse_args()
    from llmfoundry_lite import stores
    rows = {"convert": [], "transfer": []}
    with tempfile.TemporaryDirectory() as tmp, servers.moto_s3(tmp) as endpoint:
        env = {**os.environ, "S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "LLMFOUNDRY_LITE_CACHE": os.path.join(tmp, "cache"),
               "OMP_NUM_THREADS": "1"}
        os.environ.update({k: env[k] for k in ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                              "AWS_DEFAULT_REGION", "LLMFOUNDRY_LITE_CACHE")})
        import boto3
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

        ckpt = os.path.join(tmp, "ckpt", "ep0-ba1")
        info = write_sharded_checkpoint(ckpt)
        uri = "s3://bench/run/ep0-ba1"
        stores.upload_folder(ckpt, uri, last=[".metadata"])
        subprocess.run(["sync"], check=False)
        for where, source in (("local folder", ckpt), ("s3://", uri)):
            measured = convert_in_child(source, os.path.join(tmp, f"hf-{len(rows['convert'])}"), env)
            row = {"what": "convert", "source": where, **info, **measured}
            row["MiB"] = {k: round(v / 2 ** 20) for k, v in row.items() if k.endswith("bytes") or k in ("anon", "rss")}
            print(json.dumps(row), flush=True)
            rows["convert"].append(row)

        for mib in SIZES_MIB:
            path = os.path.join(tmp, f"blob{mib}")
            with open(path, "wb") as f:
                f.write(os.urandom(mib * 2 ** 20))
            t0 = time.perf_counter()
            stores.upload(path, f"s3://bench/blobs/{mib}")
            up = time.perf_counter() - t0
            t0 = time.perf_counter()
            stores.download(f"s3://bench/blobs/{mib}", path + ".back")
            down = time.perf_counter() - t0
            row = {"what": "transfer", "MiB": mib, "upload_s": round(up, 2), "upload_MiB_s": round(mib / up, 1),
                   "download_s": round(down, 2), "download_MiB_s": round(mib / down, 1)}
            print(json.dumps(row), flush=True)
            rows["transfer"].append(row)
            os.remove(path)
            os.remove(path + ".back")
    if args.out:
        with open(args.out, "a") as f:
            f.write(f"\n<!-- {datetime.date.today()} {platform.processor() or platform.machine()}, "
                    f"torch {torch.__version__}, moto server on loopback -->\n\n")
            f.write("| convert from | checkpoint MiB | weights MiB | files | peak anon MiB | peak rss MiB | seconds |\n"
                    "|---|---|---|---|---|---|---|\n")
            for r in rows["convert"]:
                f.write(f"| {r['source']} | {r['MiB']['checkpoint_bytes']} | {r['MiB']['weights_bytes']} | "
                        f"{r['files']} | {r['MiB']['anon']} | {r['MiB']['rss']} | {r['seconds']:.1f} |\n")
            f.write("\n| object MiB | upload s | upload MiB/s | download s | download MiB/s |\n|---|---|---|---|---|\n")
            for r in rows["transfer"]:
                f.write(f"| {r['MiB']} | {r['upload_s']} | {r['upload_MiB_s']} | {r['download_s']} | "
                        f"{r['download_MiB_s']} |\n")


if __name__ == "__main__":
    main()
