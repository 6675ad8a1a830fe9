"""`scripts/gpu_check.py` (`make gpu-check`) as far as a CPU allows: without CUDA it runs nothing and
exits 0; `--cpu_dry_run` goes through every step (imports, the GPU tests, a figure, the summary and
the $OUT files) on CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check")


def _run(*args, out=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    if out is not None:
        env["OUT"] = str(out)
    proc = subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_without_cuda_it_says_so_and_runs_nothing(tmp_path):
    summary = _run(out=tmp_path)
    assert summary["gpu_check"] == "skipped" and "needs a CUDA GPU" in summary["reason"]
    assert not os.listdir(tmp_path)


def test_cpu_dry_run_goes_through_every_step(tmp_path):
    before = open(os.path.join(ROOT, "benchmarks", "results", "throughput.md")).read()
    summary = _run("--cpu_dry_run", out=tmp_path)
    gpu_tests = summary["gpu_tests"]
    n_gpu_tests = sum(1 for line in open(os.path.join(ROOT, "tests", "test_gpu.py")) if line.startswith("def test_"))
    assert gpu_tests["failed"] == 0 and gpu_tests["passed"] == 0 and gpu_tests["skipped"] >= n_gpu_tests
    (figure,) = summary["figures"]
    assert "error" not in figure, figure
    assert figure["figure"] == "cpu-mpt-tiny" and figure["tokens_per_sec"] > 0 and figure["peak_memory_gib"] > 0
    assert summary["versions"]["torch"] == torch.__version__
    assert json.load(open(tmp_path / "gpu_check.json")) == summary
    rows = (tmp_path / "throughput_rows.md").read_text().splitlines()
    assert len(rows) == 1 and rows[0].startswith("| ") and "cpu-mpt-tiny" in rows[0]
    # a dry run never writes CPU numbers into the GPU results
    assert open(os.path.join(ROOT, "benchmarks", "results", "throughput.md")).read() == before
