"""The pre-flight: after the config check (which reads no network) and before anything is built, reach
every remote place a training config names, with short timeouts, and report every failure at once in
the config check's format. Without it a wrong endpoint, bucket or tracking URI would surface minutes
later from inside a library's retry loop (botocore waits 60 s to connect, streaming 60 s per file,
MLflow backs off), or not at all.
"""
from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from typing import Iterator, List, Optional, Tuple

from llmfoundry_lite import stores
from llmfoundry_lite.data.loaders import labelled_loaders
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.training.schema import TrainConfig, save_uri

TIMEOUT = 5  # seconds for an HTTP probe


def _data_remotes(tc: TrainConfig) -> Iterator[Tuple[str, str]]:
    """(key path, URI of the split's index.json) of every remote MDS split the loaders stream from."""
    loaders = [("train_loader", tc.train_loader)] + [
        (f"eval_loader {label}", s) for label, s in labelled_loaders(tc.eval_loader)]
    for where, section in loaders:
        dataset = getattr(section.config, "dataset", None)
        streams = [(f"{where}.dataset", dataset)] + [
            (f"{where}.dataset.streams.{n}", s) for n, s in (getattr(dataset, "streams", None) or {}).items()]
        for path, s in streams:
            if getattr(s, "remote", None) and stores.is_remote(s.remote):
                split = getattr(s, "split", None) or getattr(dataset, "split", None)
                yield f"{path}.remote", stores.join(s.remote, split or "", "index.json")


def remotes(tc: TrainConfig) -> List[Tuple[str, str, str]]:
    """(key path, URI, what `stores.probe` needs there) for every object-store URI of the config."""
    found = [(path, uri, "object") for path, uri in _data_remotes(tc)]
    if tc.save_folder and stores.is_remote(tc.save_folder):
        found.append(("save_folder", save_uri(tc), "bucket"))
    for path, uri in (("load_path", tc.load_path), ("tokenizer.name", tc.tokenizer.name),
                      ("model.pretrained_model_name_or_path", tc.model.kwargs.get("pretrained_model_name_or_path"))):
        if isinstance(uri, str) and stores.is_remote(uri):
            found.append((path, uri, "folder"))
    for name, section in tc.callbacks.items():
        folder = section.kwargs.get("save_folder")
        if isinstance(folder, str) and stores.is_remote(folder):
            found.append((f"callbacks.{name}.save_folder", folder, "bucket"))
    return found


def _mlflow_problem(path: str, uri: Optional[str]) -> Optional[str]:
    if importlib.util.find_spec("mlflow") is None:
        return f"{path}: the mlflow logger needs the mlflow extra: pip install 'llmfoundry-lite[mlflow]'"
    if not uri or not uri.startswith(("http://", "https://")):
        return None  # a local folder or `databricks`: nothing to reach before the run
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        urllib.request.urlopen(url, timeout=TIMEOUT).close()
    except urllib.error.HTTPError:
        return None  # the server answered (e.g. 404: no such experiment): it is reachable
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return (f"{path}.tracking_uri: cannot reach the MLflow tracking server at {uri} ({reason}); start it, "
                "fix the URI, or remove the mlflow logger")
    return None


def preflight(tc: TrainConfig) -> None:
    """Raise one ConfigError naming every remote of `tc` that cannot be reached or is missing."""
    problems = []
    for path, uri, need in remotes(tc):
        problem = stores.probe(uri, need)
        if problem and need == "object" and uri.endswith("/index.json") and ": not found" in problem:
            problem = (f"{uri}: not found: data prep did not finish writing this split (it uploads index.json last) "
                       "or the remote/split is wrong")
        if problem:
            problems.append(f"{path}: {problem}")
    if "mlflow" in tc.loggers:
        uri = tc.loggers["mlflow"].kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        problem = _mlflow_problem("loggers.mlflow", uri)
        if problem:
            problems.append(problem)
    if problems:
        raise ConfigError(problems, "cannot reach what the config names")
