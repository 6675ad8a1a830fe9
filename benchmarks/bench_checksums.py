"""What a checkpoint's checksum manifest costs: hashing a file with export/checksums.py (xxh3-128) against
reading it alone, sha256, and the torch.save that writes it; one JSON line.

    python benchmarks/bench_checksums.py [--gib 1] [--rounds 3] [--dir .]

A tensor of `--gib` GiB (random bytes, as trained weights are) is saved with torch.save into `--dir`
(the disk checkpoints go to). Then, `--rounds` times, in turn: read the file (16 MiB chunks, no work:
the limit), hash it with xxh3-128 (`file_hash`, what `write_manifest` and `verify` run), hash it with
sha256, each from the page cache ("warm": right after a save, when `write_manifest` runs), and xxh3
again after the file was dropped from the page cache with posix_fadvise DONTNEED ("cold": a relaunch
verifying a checkpoint written long ago; on a busy machine the drop may be partial). Each figure is the
median over rounds, in GB/s (1e9 bytes), with the ratios the manifest adds: hashing after a save (warm
xxh3 time / save time) and verifying at relaunch (cold xxh3 time per GB).
"""
import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llmfoundry_lite.export.checksums import file_hash  # noqa: E402  (the repository's, not an installed copy)

CHUNK = 16 * 2**20


def read_only(path: str) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def sha256(path: str) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)


def drop_from_page_cache(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=".")
    args = parser.parse_args()
    tensor = torch.randint(-2**31, 2**31 - 1, (int(args.gib * 2**30) // 4,), dtype=torch.int32)
    times = {k: [] for k in ("save", "read_warm", "xxh3_warm", "sha256_warm", "xxh3_cold")}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "ckpt.pt")
        for _ in range(args.rounds):
            times["save"].append(timed(torch.save, {"w": tensor}, path))
            read_only(path)  # into the page cache, as right after a save
            times["read_warm"].append(timed(read_only, path))
            times["xxh3_warm"].append(timed(file_hash, path))
            times["sha256_warm"].append(timed(sha256, path))
            drop_from_page_cache(path)
            times["xxh3_cold"].append(timed(file_hash, path))
        size = os.path.getsize(path)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "bytes": size, "rounds": args.rounds,
        **{f"{k}_gb_per_s": round(size / v / 1e9, 2) for k, v in median.items()},
        "hash_after_save_over_save": round(median["xxh3_warm"] / median["save"], 3),
        "xxh3_warm_over_read": round(median["xxh3_warm"] / median["read_warm"], 2),
        "verify_cold_s_per_gb": round(median["xxh3_cold"] / (size / 1e9), 3),
    }))


if __name__ == "__main__":
    main()
