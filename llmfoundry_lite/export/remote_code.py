"""The custom-code folder: our model's own source, bundled into `modeling_mpt.py` + `configuration_mpt.py`.

Rather than keep a second copy of the model for `trust_remote_code`, the modeling file is built
from the package's model modules at export time: their top-level code in dependency order, with
the `llmfoundry_lite` imports dropped (the names they import are defined earlier in the same file)
and the other imports (torch, transformers, standard library) gathered at the top. The
configuration file is a plain `PretrainedConfig` holding the exported keys (already validated when
the model was built) plus `MPTConfig`'s derived properties, copied from its source.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import pprint
from pathlib import Path

import torch

from llmfoundry_lite.compat.hf import CONFIG_DTYPE_KEY, PRETRAINED_CONFIG_KEYS
from llmfoundry_lite.models import MPTConfig

# Modules whose code goes into modeling_mpt.py, each after the ones it imports from.
MODEL_MODULES = ["errors", "compat.hf", "registry", "models.layers.norms", "models.layers.ffn", "models.layers.init",
                 "models.layers.attention", "models.mpt"]
CONFIG_MODULE = "llmfoundry_lite.models.config"
CUSTOM_MODEL_TYPE = "llmfoundry_mpt"  # not transformers' "mpt": loading without trust_remote_code fails
MODELING_FILE, CONFIG_FILE = "modeling_mpt.py", "configuration_mpt.py"
AUTO_MAP = {"AutoConfig": "configuration_mpt.MPTConfig",
            "AutoModel": "modeling_mpt.MPTModel",
            "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"}


def _top_level_names(tree: ast.Module) -> set:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def bundle_modeling_source() -> str:
    """The text of a self-contained modeling_mpt.py (imports only torch, transformers and the stdlib)."""
    imports, bodies, defined = [], [], set()
    for mod in MODEL_MODULES:
        name = f"llmfoundry_lite.{mod}"
        src = inspect.getsource(importlib.import_module(name))
        tree, drop = ast.parse(src), set()
        for i, node in enumerate(tree.body):
            is_doc = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if not (is_doc or isinstance(node, (ast.Import, ast.ImportFrom))):
                continue
            drop.update(range(node.lineno - 1, node.end_lineno))
            if is_doc or (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                continue
            internal = [a.name for a in node.names if a.name.startswith("llmfoundry_lite")] \
                if isinstance(node, ast.Import) else (node.module or "").startswith("llmfoundry_lite")
            if not internal:
                imports.append(ast.get_source_segment(src, node))
            elif node.module == CONFIG_MODULE:
                imports.append(f"from .configuration_mpt import {', '.join(a.name for a in node.names)}")
            elif isinstance(node, ast.Import) or any(a.name not in defined for a in node.names):
                raise RuntimeError(f"{name}: cannot bundle `{ast.get_source_segment(src, node)}`; import "
                                   f"names from modules listed earlier in remote_code.MODEL_MODULES")
        own = _top_level_names(tree)
        if clash := own & defined:
            raise RuntimeError(f"{name} redefines {sorted(clash)}, defined by an earlier bundled module")
        defined |= own
        body = "\n".join(line for j, line in enumerate(src.splitlines()) if j not in drop).strip("\n")
        bodies.append(f"# ---- from {name} " + "-" * max(0, 80 - len(name)) + f"\n{body}\n")
    header = ('"""MPT model, exported by llmfoundry_lite (its model source, bundled for trust_remote_code)."""\n'
              "from __future__ import annotations\n\n")
    return header + "\n".join(dict.fromkeys(imports)) + "\n\n\n" + "\n\n".join(bodies)


def bundle_config_source() -> str:
    """The text of configuration_mpt.py: the exported keys with their defaults, plus derived properties."""
    base = PRETRAINED_CONFIG_KEYS | {"model_type"}
    keys = {k: v for k, v in MPTConfig().to_dict().items() if k not in base}
    properties = [inspect.getsource(v.fget) for v in vars(MPTConfig).values() if isinstance(v, property)]
    return (
        '"""MPT configuration, exported by llmfoundry_lite (keys as written in config.json)."""\n'
        "import copy\n\nfrom transformers import PretrainedConfig\n\n"
        f"MODEL_KEYS = {pprint.pformat(keys, indent=4, sort_dicts=True)}\n\n\n"
        "class MPTConfig(PretrainedConfig):\n"
        f"    model_type = {CUSTOM_MODEL_TYPE!r}\n"
        f"    attribute_map = {MPTConfig.attribute_map!r}\n\n"
        "    def __init__(self, **kwargs):\n"
        "        for key, default in MODEL_KEYS.items():\n"
        "            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))\n"
        "        super().__init__(**kwargs)\n\n" + "\n".join(properties))


def write_remote_code(config, out_dir: str, dtype: torch.dtype, special_ids: dict) -> None:
    """config.json (model_type llmfoundry_mpt, auto_map) and the two code files into `out_dir`."""
    Path(out_dir, MODELING_FILE).write_text(bundle_modeling_source())
    Path(out_dir, CONFIG_FILE).write_text(bundle_config_source())
    data = config.to_dict()
    data["attn_config"] = {**data["attn_config"], "attn_impl": "torch"}  # loadable anywhere; flash is opt-in
    data.pop("torch_dtype", None)
    data.update(model_type=CUSTOM_MODEL_TYPE, auto_map=AUTO_MAP, architectures=["MPTForCausalLM"],
                init_device="cpu", **{CONFIG_DTYPE_KEY: str(dtype).replace("torch.", "")},
                **{k: v for k, v in special_ids.items() if v is not None})
    Path(out_dir, "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))

