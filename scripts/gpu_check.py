"""`make gpu-check`: every CUDA path of llmfoundry_lite on this machine's own stack, in one command.

Run from the repository root of a GPU machine (its own Python, torch and transformers):
1. prepare: installs into .gpu_site/ the wheels carried in gpu_wheels/ (`make gpu-wheels` downloads them
   on a machine with the registry) whose packages this Python lacks: Composer, streaming, omegaconf and
   their small needs. Nothing is downloaded here; the project itself runs from the checkout.
2. `pytest -m gpu tests/test_gpu.py`: each CUDA-only path against the reference path.
3. the GPU throughput figures (MPT-125M, 350M and 1B, seq 2048, bf16, per-block compile, and MPT-7B
   LoRA r=8 on one GPU, the notebook user's case), a few steps each through
   `benchmarks/bench_throughput.py`; flash-attn when importable, else `attn_impl: flex`.
4. one JSON summary on stdout (tests passed/failed, tokens/s, MFU, peak memory per figure, versions);
   the figure rows are appended to benchmarks/results/throughput.md, and everything goes to $OUT too
   when that is set.
Without CUDA it says so and exits 0. `--cpu_dry_run` runs every step on CPU (the GPU tests skip, one
tiny CPU figure instead of the GPU ones, results not appended) to check the script and the carried
wheels on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHEELS = os.path.join(REPO, "gpu_wheels")
SITE = os.path.join(REPO, ".gpu_site", f"py{sys.version_info.major}.{sys.version_info.minor}")  # binary wheels
RESULTS = os.path.join(REPO, "benchmarks", "results", "throughput.md")
GPU_FIGURES = ("gpu-mpt-125m", "gpu-mpt-350m", "gpu-mpt-1b", "gpu-mpt-7b-lora")
SLOW_FIGURES = {"gpu-mpt-7b-lora": 2}  # figure -> times --figure_timeout (MPT-7B: materialising 27 GB of weights)
CPU_FIGURE = "cpu-mpt-tiny"


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


def _dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def prepare() -> dict:
    """Install the carried wheels this Python lacks into .gpu_site/ (on sys.path and PYTHONPATH from now on)."""
    sys.path[:0] = [SITE, REPO]
    os.environ["PYTHONPATH"] = os.pathsep.join([SITE, REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    wheels = sorted(glob.glob(os.path.join(WHEELS, "*.whl")))
    missing = [w for w in wheels if not _installed(_dist_name(w))]
    if missing:
        log(f"installing {len(missing)} carried wheels into {SITE}: {', '.join(map(_dist_name, missing))}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--target", SITE, *missing], check=True)
        importlib.invalidate_caches()
    for module in ("composer", "streaming", "omegaconf"):
        try:
            __import__(module)
        except ImportError as e:
            sys.exit(f"[gpu-check] cannot import {module} ({e}): run `make gpu-wheels` on a machine with the "
                     f"package registry and carry gpu_wheels/ here")
    import llmfoundry_lite.eval  # noqa: F401  (the whole package imports on this stack)
    import llmfoundry_lite.training.entry  # noqa: F401  (likewise)
    return {"carried_wheels_installed": [_dist_name(w) for w in missing]}


def versions() -> dict:
    import torch
    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    for dist in ("transformers", "mosaicml", "mosaicml-streaming", "flash-attn", "triton"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def run_gpu_tests(timeout: int) -> dict:
    """`pytest -m gpu tests/test_gpu.py`; counts from its JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
               f"--junitxml={report}", os.path.join(REPO, "tests", "test_gpu.py")]
        log(" ".join(cmd[1:]))
        start = time.time()
        try:
            proc = subprocess.run(cmd, cwd=REPO, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s"}
        if not os.path.exists(report):
            return {"error": f"pytest exited {proc.returncode} without a report"}
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None
                  or c.find("error") is not None]
    return {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"],
            "failed_tests": failed, "seconds": round(time.time() - start, 1)}


def run_figure(name: str, overrides: list, steps: int, warmup: int, timeout: int, out_md: str) -> dict:
    """One throughput figure in its own process (its own CUDA memory and compile caches)."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "bench_throughput.py"),
           os.path.join(REPO, "benchmarks", "figures", f"{name}.yaml"), *overrides,
           f"--steps={steps}", f"--warmup={warmup}", f"--out={out_md}"]
    log(" ".join(cmd[1:]))
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"figure": name, "error": f"timed out after {timeout}s"}
    rows = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not rows:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        return {"figure": name, "error": f"exit {proc.returncode}", "log_tail": tail}
    row = json.loads(rows[-1])
    row["seconds"] = round(time.time() - start, 1)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu_dry_run", action="store_true", help="run every step on CPU (no GPU here)")
    parser.add_argument("--steps", type=int, default=10, help="timed batches per figure")
    parser.add_argument("--warmup", type=int, default=3, help="batches before timing (compilation)")
    parser.add_argument("--test_timeout", type=int, default=180, help="seconds for the GPU tests")
    parser.add_argument("--figure_timeout", type=int, default=90, help="seconds per figure")
    args = parser.parse_args()

    import torch
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print(json.dumps({"gpu_check": "skipped", "reason": "needs a CUDA GPU (torch.cuda.is_available() is "
                          "False); nothing was run. --cpu_dry_run runs the steps on CPU."}))
        return 0
    summary = {"gpu_check": "cpu_dry_run" if args.cpu_dry_run else "cuda", **prepare(), "versions": versions()}
    summary["gpu_tests"] = run_gpu_tests(args.test_timeout)

    out_dir = os.environ.get("OUT")
    rows_md = os.path.join(out_dir, "throughput_rows.md") if out_dir else None
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "rows.md")
        if args.cpu_dry_run:
            figures.append(run_figure(CPU_FIGURE, [], 2, 1, args.figure_timeout, table))
        else:
            try:
                import flash_attn  # noqa: F401  (only whether it imports)
                impl = "flash"
            except ImportError:  # no wheel on the registry; a source build needs the internet
                impl = "flex"
            summary["attn_impl"] = impl
            for name in GPU_FIGURES:
                figures.append(run_figure(name, [f"model.attn_config.attn_impl={impl}"], args.steps,
                                          args.warmup, args.figure_timeout * SLOW_FIGURES.get(name, 1), table))
        rows = open(table).read() if os.path.exists(table) else ""
    keep = ("figure", "overrides", "tokens_per_sec", "mfu", "hfu", "peak_memory_gib", "params_M", "global_batch",
            "seconds", "error", "log_tail")
    summary["figures"] = [{k: f[k] for k in keep if k in f} for f in figures]
    if rows and not args.cpu_dry_run:
        with open(RESULTS, "a") as f:
            f.write(rows)
        log(f"appended {rows.count(chr(10))} rows to {os.path.relpath(RESULTS, REPO)}")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(rows_md, "w") as f:
            f.write(rows)
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
            json.dump(summary, f, indent=2)
    print(json.dumps(summary))
    ok = not summary["gpu_tests"].get("failed") and "error" not in summary["gpu_tests"] \
        and all("error" not in f for f in figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
