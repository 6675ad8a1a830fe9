"""Reading Composer checkpoints without Composer, a GPU or a process group.

A checkpoint of `ComposerMPTCausalLM` (a Composer `HuggingFaceModel`) holds the weights under
`state.model` with names prefixed `model.`, and the HF config and tokenizer files under
`state.integrations.huggingface` (`{'model': {'config': {'content': {...}}}, 'tokenizer': {file:
{'file_extension', 'content'}}}`). Two layouts:
- full: one `.pt` file, opened with `mmap=True` (a tensor is read from disk only when used: the
  optimizer state never is, and a converter needs memory for one tensor at a time);
- sharded: a torch.distributed.checkpoint (DCP) folder (`.metadata` + `__R_N.distcp`); tensors are
  loaded one by one with `no_dist=True`, and only `state.model.*` and `state.integrations.huggingface.*`
  are read.
Every pickle in them is read through export/safe_load.py (no checkpoint runs code), and a checkpoint
with a checksum manifest (export/checksums.py) is verified before it is read.
"""
from __future__ import annotations

import json
import os
import tempfile
import warnings
from typing import Any, Dict, Mapping, NamedTuple, Optional, Set, Tuple

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from llmfoundry_lite import stores
from llmfoundry_lite.assembly.weights import check_state_dict, model_from_weights
from llmfoundry_lite.data.tokenizer import build_tokenizer
from llmfoundry_lite.errors import CheckpointError
from llmfoundry_lite.export import checksums
from llmfoundry_lite.export.safe_load import check_sharded, load_entry, load_pt, refusal_inside
from llmfoundry_lite.models import MPTConfig

MODEL_PREFIX = "model."
LATEST = "latest-rank0.pt"  # Composer's default `save_latest_filename` for rank 0
LATEST_SHARDED = "latest-sharded-rank0"  # llm-foundry's, for sharded checkpoints
# In an object store a save_folder's latest link is an object holding the checkpoint's key (Composer's name).
POINTER = LATEST + ".symlink"


def is_composer_checkpoint(path: str) -> bool:
    """True for a `.pt` file, a sharded (DCP) folder, or a save_folder with a latest-checkpoint link."""
    return os.path.isfile(path) or any(os.path.exists(os.path.join(path, name))
                                       for name in (".metadata", LATEST, LATEST_SHARDED))


def _strip(name: str) -> Optional[str]:
    """'model.transformer.wte.weight' -> 'transformer.wte.weight', without torch.compile's `_orig_mod.`
    wrapper prefix (None for non-model entries)."""
    return name[len(MODEL_PREFIX):].replace("_orig_mod.", "") if name.startswith(MODEL_PREFIX) else None


def _dcp_load(holder: Dict[str, Any], reader) -> None:
    """Fill `holder` (flat checkpoint keys) in this process alone, without a process group."""
    class DataOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:  # DCP's own unpickles with weights_only=False
            self.state_dict[read_item.dest_index.fqn] = load_entry(value, f"{read_item.dest_index.fqn} in {reader.path}")

    # The default planner fills a flattened copy of the dict, which loses the non-tensor values.
    planner = DataOnlyPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        try:
            dcp.load(holder, storage_reader=reader, planner=planner, no_dist=True)
        except CheckpointException as e:  # DCP wraps what failed in each rank
            refused = refusal_inside(e)
            if refused is not None:
                raise refused from None
            cause = next(iter(e.failures.values()))
            cause = cause[0] if isinstance(cause, tuple) else cause
            raise CheckpointError(f"{reader.path}: a shard cannot be read ({cause!r}); is the checkpoint "
                                  "truncated or incomplete?") from None


class _DCPWeights(Mapping):
    """Model tensors of a DCP folder, each read from disk when it is looked up."""
    def __init__(self, reader, fqns: Dict[str, str], metadata):
        self.reader, self.fqns, self.metadata = reader, fqns, metadata

    def __getitem__(self, name: str) -> torch.Tensor:
        fqn = self.fqns[name]
        meta = self.metadata.state_dict_metadata[fqn]
        holder = {fqn: torch.empty(meta.size, dtype=meta.properties.dtype)}
        _dcp_load(holder, self.reader)
        return holder[fqn]

    def shape_of(self, name: str) -> torch.Size:  # for check_state_dict, without reading the tensor
        return self.metadata.state_dict_metadata[self.fqns[name]].size

    def __iter__(self):
        return iter(self.fqns)

    def __len__(self):
        return len(self.fqns)


def _nest(flat: Dict[Tuple, Any]) -> Any:
    """{('model', 'config', 'content', 'd_model'): 64, ('a', 0): x, ...} -> nested dicts and lists
    (DCP flattens lists of non-tensors too, with integer indices in the path)."""
    root: Dict[Any, Any] = {}
    for path, value in flat.items():
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    def rebuild(node):
        if not isinstance(node, dict):
            return node
        if node and all(isinstance(k, int) for k in node):
            return [rebuild(node[i]) for i in sorted(node)]
        return {k: rebuild(v) for k, v in node.items()}
    return rebuild(root)


def _open_dcp(path: str) -> Tuple[Dict[str, Any], Mapping[str, torch.Tensor]]:
    metadata = check_sharded(path)
    reader = FileSystemReader(path)
    paths = metadata.planner_data or {}
    fqns, hf_paths, optimizers = {}, {}, set()
    for fqn, entry in metadata.state_dict_metadata.items():
        p = tuple(paths.get(fqn, fqn.split(".")))
        if "optimizers" in p[:2] and len(p) > p.index("optimizers") + 1:  # under state (or at the root)
            optimizers.add(p[p.index("optimizers") + 1])
        if p[:2] == ("state", "model") and isinstance(entry, TensorStorageMetadata):
            name = _strip(".".join(p[2:]))
            if name is not None:
                fqns[name] = fqn
        elif p[:3] == ("state", "integrations", "huggingface"):
            hf_paths[fqn] = p[3:]
    holder = dict.fromkeys(hf_paths)
    if holder:
        _dcp_load(holder, reader)
    hf_state = _nest({hf_paths[fqn]: value for fqn, value in holder.items()})
    return hf_state, _DCPWeights(reader, fqns, metadata), optimizers


def pointed_name(uri: str) -> Optional[str]:
    """The name (under the prefix `uri`) of the checkpoint a save_folder's POINTER object names, or None."""
    if not stores.exists(stores.join(uri, POINTER)):
        return None
    key = stores.read_text(stores.join(uri, POINTER)).strip().rstrip("/")
    prefix = stores.split(uri)[2] + "/"
    return key[len(prefix):] if key.startswith(prefix) else os.path.basename(key)


def fetch_checkpoint(uri: str) -> str:
    """A local copy of the checkpoint `uri` names in an object store: a `.pt` object (with its checksum
    manifest), a sharded checkpoint's prefix, or a save_folder's prefix (the checkpoint its pointer
    names). Local paths are returned as given; what is downloaded is then read like a local checkpoint."""
    if not stores.is_remote(uri):
        return uri
    name = None if stores.exists(uri) else pointed_name(uri)
    return stores.localize(stores.join(uri, name) if name else uri, siblings=(checksums.SUFFIX,))


def resolve(path: str) -> str:
    """The checkpoint (file or DCP folder) `path` names: itself, or in a Composer save_folder the one its
    latest link points at."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, ".metadata")):
        latest = [os.path.join(path, name) for name in (LATEST, LATEST_SHARDED) if os.path.exists(os.path.join(path, name))]
        path = os.path.realpath(latest[0]) if latest else path
    return path


def _open(path: str) -> Tuple[Dict[str, Any], Mapping[str, torch.Tensor], Set[str]]:
    """(huggingface integration metadata, lazy name -> tensor mapping with HF parameter names, the
    class names of the optimizers whose state it holds) of a checkpoint (see `resolve`)."""
    path = resolve(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, ".metadata")):
            raise CheckpointError(f"{path} is a folder without .metadata: not a sharded Composer checkpoint")
        return _open_dcp(path)
    ckpt = load_pt(path)
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a Composer checkpoint (no state.model); "
                              "give a file written by `llmfoundry-lite train` (save_folder)")
    weights = {_strip(key): tensor for key, tensor in state["model"].items() if _strip(key) is not None}
    return state.get("integrations", {}).get("huggingface", {}), weights, set(state.get("optimizers") or {})


def _restore_template_special_tokens(node):
    """DCP drops empty dicts when it flattens a sharded checkpoint's state, but `tokenizers` requires a
    TemplateProcessing post-processor's `special_tokens` (tokenizers >= 0.23 writes it empty)."""
    if isinstance(node, list):
        return [_restore_template_special_tokens(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _restore_template_special_tokens(v) for k, v in node.items()}
    if out.get("type") == "TemplateProcessing":
        out.setdefault("special_tokens", {})
    return out


def _read_tokenizer(hf_state: Dict[str, Any]):
    """The tokenizer saved with the run (files stored by Composer's HuggingFaceModel), or None."""
    files = hf_state.get("tokenizer")
    if not files:
        return None

    with tempfile.TemporaryDirectory() as tmp:
        for name, saved in files.items():
            ext, content = saved["file_extension"], saved["content"]
            if os.path.basename(name + ext) != name + ext or name.startswith("."):  # "../../x", "/etc/x"
                raise CheckpointError(f"tokenizer file name {name + ext!r} in the checkpoint is not a plain "
                                      "file name; refused (it would be written outside the tokenizer folder)")
            target = os.path.join(tmp, name if name.endswith(ext) else name + ext)
            if ext == ".json":
                content = json.dumps(_restore_template_special_tokens(content))
            elif ext == ".txt":
                content = "".join(line + "\n" for line in content)
            with open(target, "wb") as f:  # .model: a serialized sentencepiece proto; .py, .jinja: text
                f.write(content if ext == ".model" else content.encode("utf-8"))
        return build_tokenizer(tmp)


class Checkpoint(NamedTuple):
    config: Any                               # MPTConfig
    tokenizer: Any                            # the run's tokenizer, or None
    weights: Mapping[str, torch.Tensor]       # lazy: HF name (peft's names in a LoRA run) -> tensor
    lora: Optional[Dict[str, Any]]            # a LoRA run's adapter config (peft's adapter_config.json), else None


def read_composer_checkpoint(path: str) -> Checkpoint:
    """What a full or sharded checkpoint holds; `lora` is set for a LoRA run's (its weights then have
    peft's names, `base_model.model.<MPT name>`, a targeted layer's weight under `.base_layer.`)."""
    checksums.check(resolve(path))
    hf_state, weights, _ = _open(path)
    try:
        content = dict(hf_state["model"]["config"]["content"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{path} has no Hugging Face model config (state.integrations.huggingface); "
                              "it was not written by `llmfoundry-lite train` or a Composer HuggingFaceModel") from None
    if content.get("model_type") != "mpt":
        raise CheckpointError(f"{path} holds a '{content.get('model_type')}' model; only MPT checkpoints convert")
    if not weights:
        raise CheckpointError(f"{path} holds no model weights under state.model")
    content["init_device"] = "cpu"
    lora = (hf_state["model"].get("peft_config") or {}).get("content")  # Composer stores it for a PeftModel
    return Checkpoint(MPTConfig(**content), _read_tokenizer(hf_state), weights, dict(lora) if lora else None)


def open_composer_checkpoint(path: str):
    """(MPTConfig, tokenizer or None, lazy mapping HF name -> tensor) of a full or sharded checkpoint."""
    return read_composer_checkpoint(path)[:3]


def load_composer_checkpoint(path: str):
    """(model in eval mode on CPU, tokenizer or None) from a full `.pt` or a sharded folder: an
    MPTForCausalLM, or for a LoRA run's checkpoint the `peft.PeftModel` around it (adapters unmerged)."""
    config, tokenizer, weights, lora = read_composer_checkpoint(path)
    return model_from_weights(config, weights, path, lora), tokenizer


def check_resumable(path: str, model, optimizer, weights_only: bool,
                    fix: str = "set the model keys to those of the run that saved it") -> None:
    """Before a run loads `path` (`load_path`, or the checkpoint autoresume chose): the checkpoint holds
    this model's weights and, for a full resume, state of this run's optimizer. Composer would otherwise
    fail deep inside loading, or silently start the optimizer afresh."""
    _, weights, optimizers = _open(path)
    check_state_dict(model, weights, path, fix)
    name = type(optimizer).__name__
    if not weights_only and name not in optimizers:
        raise CheckpointError(f"{path} holds the state of optimizer {sorted(optimizers) or 'none'}, this run uses "
                              f"{name}: a full resume needs the optimizer it was saved with; use that one, or set "
                              "load_weights_only: true to start the optimizer and schedule afresh")
