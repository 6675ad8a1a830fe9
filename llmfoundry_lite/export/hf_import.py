"""Loading a Hugging Face MPT folder into `MPTForCausalLM`.

Accepted: folders written by `transformers.MptForCausalLM.save_pretrained`, MosaicML's original
custom-code layout (`mosaicml/mpt-7b`: `attn_config`/`init_config` dicts, `auto_map`,
`pytorch_model*.bin` shards) and our own exports (native, or `model_type: llmfoundry_mpt`). The
parameter names are the same in all of them. Any missing or unexpected weight is an error: a model
that silently kept random weights would be worse than none. Other architectures are refused.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Mapping, Optional

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open

from llmfoundry_lite.assembly.weights import check_state_dict
from llmfoundry_lite.errors import CheckpointError, pickle_refusal, refused
from llmfoundry_lite.export.remote_code import CUSTOM_MODEL_TYPE
from llmfoundry_lite.files import read_json_file
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

MPT_MODEL_TYPES = ("mpt", CUSTOM_MODEL_TYPE)


def _folder(path_or_name: str, token=None) -> str:
    """A local folder holding config.json (a hub name is resolved through the HF cache, `token` for a
    gated one)."""
    if os.path.isdir(path_or_name):
        if not os.path.isfile(os.path.join(path_or_name, "config.json")):
            raise CheckpointError(f"{path_or_name} has no config.json: not a Hugging Face model folder")
        return path_or_name
    try:
        return snapshot_download(path_or_name, token=token, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt",
                                                                "*.model", "*.py", "*.jinja"])
    except Exception as e:  # noqa: BLE001  (offline, unknown repo, no network: all the same to the user)
        raise CheckpointError(f"cannot find model '{path_or_name}': not a local folder, and the hub "
                              f"lookup failed ({type(e).__name__}); pass a local folder path") from None


def _merge(base: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_hf_config(path_or_name: str, config_overrides: Optional[Dict[str, Any]] = None, token=None):
    """(local folder, MPTConfig) for an HF MPT folder; `config_overrides` may change e.g. max_seq_len."""
    folder = _folder(path_or_name, token)
    data = read_json_file(os.path.join(folder, "config.json"), "a Hugging Face model folder")
    if not isinstance(data, dict):
        raise CheckpointError(f"{folder}/config.json holds a {type(data).__name__}, not a model config object")
    model_type = data.pop("model_type", None)
    if model_type not in MPT_MODEL_TYPES:
        raise CheckpointError(f"{path_or_name} is a '{model_type}' model (architectures "
                              f"{data.get('architectures')}); llmfoundry_lite loads MPT models only")
    attn = data.get("attn_config")  # MosaicML's kernels are no model property: ours is picked at load time
    if isinstance(attn, dict) and attn.get("attn_impl") in ("triton", "flash"):
        data["attn_config"] = {**attn, "attn_impl": "torch"}
    data["init_device"] = "cpu"
    return folder, MPTConfig(**_merge(data, config_overrides or {}))


# `from_pretrained` arguments; every other keyword of `load_hf_model` overrides a config key.
_LOADING_KWARGS = {"torch_dtype", "dtype", "device_map", "low_cpu_mem_usage", "revision", "cache_dir",
                   "local_files_only", "token", "attn_implementation"}


def load_hf_model(path_or_name: str, **kwargs):
    """`MPTForCausalLM` with the weights of an HF MPT folder (or hub name while online).

    Keywords that are config keys override the folder's config before the model is built (nested
    dicts merge), e.g. `max_seq_len=4096` for ALiBi extrapolation or `attn_config={"attn_impl":
    "flash"}`; `torch_dtype`, `device_map`, ... go to `from_pretrained`.
    """
    loading = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOADING_KWARGS}
    folder, config = load_hf_config(path_or_name, kwargs, loading.get("token"))
    try:
        # mismatched shapes are reported by us below, in the same words on every transformers version
        model, info = MPTForCausalLM.from_pretrained(folder, config=config, output_loading_info=True,
                                                     ignore_mismatched_sizes=True, **loading)
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as e:  # truncated, unreadable
        if pickle_refusal(e):
            raise refused(f"a weights file in {folder}", e) from None
        detail = " ".join(line.strip() for line in str(e).splitlines()[:3])[:500]
        raise CheckpointError(f"cannot load the weights in {folder}: {detail}") from None
    # what the folder held, from transformers' report (name -> tensor, or shape; None: unknown or irrelevant);
    # a mismatched key is a name in transformers 4, (name, stored shape, model shape) in 5
    found = {k: v for k, v in model.state_dict().items() if k not in info["missing_keys"]}
    found.update(dict.fromkeys(info["unexpected_keys"]))
    found.update((m, None) if isinstance(m, str) else m[:2] for m in info.get("mismatched_keys", []))
    check_state_dict(model, found, folder, _MATCH_FIX)
    return model.eval()


_MATCH_FIX = "config.json (with any overrides) must describe the weight files beside it: restore the config.json " \
             "saved with these weights"


class FolderWeights(Mapping):
    """The tensors of an HF folder's weight files by name, each read only when asked for (safetensors
    by name, `.bin` through a memory map): a model built on `meta` loads piece by piece."""

    def __init__(self, folder: str):
        self._files, self._bins = {}, {}
        for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            path = os.path.join(folder, index)
            if os.path.isfile(path):
                weight_map = read_json_file(path, "a weight index").get("weight_map", {})
                self._files = {k: os.path.join(folder, f) for k, f in weight_map.items()}
                return
        for single in ("model.safetensors", "pytorch_model.bin"):
            path = os.path.join(folder, single)
            if os.path.isfile(path):
                self._files = dict.fromkeys(self._open(path).keys(), path)
                return
        raise CheckpointError(f"{folder} holds no weights (model.safetensors or pytorch_model.bin, or an index)")

    def _open(self, path: str):
        if path.endswith(".safetensors"):
            return safe_open(path, "pt")
        if path not in self._bins:
            self._bins[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._bins[path]

    def __getitem__(self, name: str):
        opened = self._open(self._files[name])
        return opened.get_tensor(name) if hasattr(opened, "get_tensor") else opened[name]

    def shape_of(self, name: str):
        opened = self._open(self._files[name])
        return opened.get_slice(name).get_shape() if hasattr(opened, "get_slice") else opened[name].shape

    def __iter__(self):
        return iter(self._files)

    def __len__(self):
        return len(self._files)


def load_when_materialized(model, folder: str) -> None:
    """Make `model`, built on `meta`, take the weights of `folder` when it is materialised (after FSDP
    sharding, or by assembly/sharding.py's `materialize_meta` without it): its `param_init_fn`, called with
    each module holding full-size tensors, copies the module's own parameters from the folder instead
    of initialising them; every rank then keeps its shard. Mismatched weights are refused up front."""
    weights = FolderWeights(folder)
    check_state_dict(model, weights, folder, _MATCH_FIX)
    prefixes = {id(m): prefix for prefix, m in model.named_modules()}

    def load_own_parameters(module):
        prefix = prefixes[id(module)]
        with torch.no_grad():
            for name, param in module.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                if key in weights:  # not there: a tied lm_head, which is the embedding
                    param.copy_(weights[key])
    model.param_init_fn = load_own_parameters
