"""Real servers for the tests, each a separate process run from .venv-tools (`make test` builds it from
requirements/tools.txt; nothing of it goes into the tested venv): moto's S3 endpoint and an MLflow
tracking server. conftest.py turns them into the `s3_server`, `bucket` and `mlflow_server` fixtures."""
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_BIN = os.path.join(ROOT, ".venv-tools", "bin")


def tool(name: str) -> str:
    """The path of a program in .venv-tools; fails the test (never skips) when it is missing."""
    path = os.path.join(TOOLS_BIN, name)
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `make test` (it builds .venv-tools)", pytrace=False)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    """Whether `url` answers HTTP at all (an error status is an answer); no proxy for a local server."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        opener.open(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (a server's workers too), SIGKILL if it is not gone in 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def serve(cmd: list, url: str, log_path: str, timeout: float):
    """Start `cmd` in a process group of its own, its output in `log_path`; yield once GET `url` answers
    (fail with the log if it exits or does not answer within `timeout` seconds); then stop it."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=os.path.dirname(log_path))
    try:
        deadline = time.monotonic() + timeout
        while not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with code {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout} s"
                with open(log_path, errors="replace") as f:
                    pytest.fail(f"{' '.join(cmd)}: {why} from {url}; its log:\n{f.read()[-5000:]}", pytrace=False)
            time.sleep(0.2)
        yield
    finally:
        _stop(proc)


@contextlib.contextmanager
def moto_s3(folder: str):
    """moto's S3 on a free port, its log in `folder`; yields the endpoint URL."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    port = endpoint.rsplit(":", 1)[1]
    with serve([tool("moto_server"), "-H", "127.0.0.1", "-p", port], endpoint, os.path.join(folder, "moto.log"), 30):
        yield endpoint


@contextlib.contextmanager
def mlflow_tracking(folder: str):
    """An MLflow tracking server (SQLite store and artifacts in `folder`) on a free port; yields the
    tracking URI. Allows 90 s: the first start creates and migrates the SQLite schema."""
    uri = f"http://127.0.0.1:{free_port()}"
    cmd = [tool("mlflow"), "server", "--backend-store-uri", f"sqlite:///{os.path.join(folder, 'mlflow.db')}",
           "--default-artifact-root", os.path.join(folder, "artifacts"), "--host", "127.0.0.1",
           "--port", uri.rsplit(":", 1)[1], "--workers", "1"]
    with serve(cmd, f"{uri}/health", os.path.join(folder, "mlflow.log"), 90):
        yield uri
