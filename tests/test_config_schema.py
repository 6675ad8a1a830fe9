import dataclasses
from typing import Dict, List, Literal, Optional, Union

import pytest

from llmfoundry_lite.config import check, cross, load_config, parse
from llmfoundry_lite.errors import ConfigError, UserError
from llmfoundry_lite.registry import Registry, signature_config


@dataclasses.dataclass
class Inner:
    rate: float
    kind: Literal["a", "b"] = "a"


@dataclasses.dataclass
class Outer:
    name: str
    inner: Inner
    sizes: List[int] = dataclasses.field(default_factory=list)
    batch: Union[int, str] = 1
    extra: Optional[Dict[str, int]] = None

    @cross("batch")
    def _auto_or_int(self, path):
        if isinstance(self.batch, str) and self.batch != "auto":
            return f"{path}.batch: 'auto' or an int"


def test_valid_config_builds_nested_dataclasses():
    obj = parse(Outer, {"name": "x", "inner": {"rate": 1, "kind": "b"}, "sizes": [1, 2], "batch": "auto"})
    assert obj.inner == Inner(rate=1.0, kind="b") and isinstance(obj.inner.rate, float)
    assert obj.sizes == [1, 2]


def test_every_problem_reported_at_once_with_paths_and_suggestions():
    _, problems = check(Outer, {"nmae": "x", "inner": {"rte": 1, "kind": "c"}, "sizes": [1, "two"], "batch": 1.5},
                        "cfg")
    text = "\n".join(problems)
    assert "cfg.nmae: unknown key (did you mean 'name'?)" in text
    assert "cfg.name: missing required key" in text
    assert "cfg.inner.rte: unknown key (did you mean 'rate'?)" in text
    assert "cfg.inner.kind: 'c' is not allowed" in text
    assert "cfg.sizes[1]: expected int" in text
    assert "cfg.batch: expected int or str" in text
    assert len(problems) == 7  # the missing inner.rate too


def test_cross_field_rule_runs_when_its_fields_are_valid():
    with pytest.raises(ConfigError, match=r"batch: 'auto' or an int"):
        parse(Outer, {"name": "x", "inner": {"rate": 1}, "batch": "many"})
    _, problems = check(Outer, {"name": 3, "inner": {"rate": 1}, "batch": "many"}, "cfg")  # another field is bad
    assert problems == ["cfg.name: expected str, got int 3", "cfg.batch: 'auto' or an int"]
    _, problems = check(Outer, {"name": "x", "inner": {"rate": 1}, "batch": 1.5}, "cfg")  # its own field is bad
    assert problems == ["cfg.batch: expected int or str, got 1.5"]


def test_config_derived_from_a_signature():
    def opt(params, lr, betas=(0.9, 0.95), weight_decay=0.0):
        pass
    cfg = signature_config(opt, supplied=("params",))
    assert check(cfg, {"lr": 1e-3, "weight_decay": 0}, "optimizer")[1] == []
    _, problems = check(cfg, {"weight_decy": 0}, "optimizer")
    assert problems == ["optimizer.weight_decy: unknown key (did you mean 'weight_decay'?)",
                        "optimizer.lr: missing required key"]
    _, problems = check(cfg, {"lr": 1, "params": []}, "optimizer")  # the framework passes params itself
    assert problems == ["optimizer.params: unknown key"]
    assert signature_config(lambda **kw: None) is None  # **kwargs: any key goes


def test_load_config_interpolation_overrides_and_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("variables:\n  seq: 128\nmax_seq_len: ${variables.seq}\nmodel:\n  d_model: 64\n")
    cfg = load_config(str(y), ["model.d_model=32", "seed=3"])
    assert cfg == {"max_seq_len": 128, "model": {"d_model": 32}, "seed": 3}
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(str(y), ["seed"])
    y.write_text("a: ${variables.nope}\n")
    with pytest.raises(ConfigError):
        load_config(str(y))


def test_registry_lookup_and_did_you_mean():
    r = Registry("widget")
    r.register("alpha")(object)
    assert r.get("alpha") is object and "alpha" in r
    with pytest.raises(UserError, match=r"unknown widget 'alpah' \(did you mean 'alpha'\?\)"):
        r.get("alpah")


def test_builtin_names_are_known_without_importing_their_modules():
    """A fresh process that imports only the registry module finds every built-in entry (each registry
    loads the module that defines its entries on first use)."""
    import subprocess
    import sys
    code = ("from llmfoundry_lite import registry as r; import sys; "
            "assert 'llmfoundry_lite.training.builders' not in sys.modules; "
            "print(all(n in reg for reg, n in ((r.optimizers, 'decoupled_lionw'), (r.models, 'mpt_causal_lm'), "
            "(r.dataloaders, 'text'), (r.icl_tasks, 'schema'), (r.norms, 'rmsnorm'), (r.ffns, 'mptglu'), "
            "(r.attention_impls, 'flex'), (r.param_inits, 'baseline_'), (r.callbacks, 'speed_monitor'), "
            "(r.preprocessors, 'dolly'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def test_a_broken_task_list_file_is_one_problem_among_the_others(tmp_path):
    from llmfoundry_lite.config import ListOrFile, Positive

    tasks_or_file = ListOrFile[Inner, "tasks"]

    @dataclasses.dataclass
    class Suite:
        tasks: tasks_or_file
        size: Positive

    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks: [1, 2\n")
    _, problems = check(Suite, {"tasks": str(bad), "size": 0}, "cfg")
    assert len(problems) == 2 and problems[0].startswith(f"cfg.tasks: {bad}: ") and "must be positive" in problems[1]


def test_public_train_is_callable_before_and_after_its_package_loads():
    """`from llmfoundry_lite import train` calls training whether or not a `llmfoundry_lite.training.*`
    module was imported first (which binds the package to that name): each call here reaches the config
    check, which refuses the missing file."""
    import subprocess
    import sys
    code = ("import llmfoundry_lite\n"
            "from llmfoundry_lite.errors import UserError\n"
            "for _ in range(2):\n"
            "    from llmfoundry_lite import train\n"
            "    try:\n"
            "        train('no_such.yaml')\n"
            "    except UserError as e:\n"
            "        print('refused', 'no_such.yaml' in str(e))\n"
            "import llmfoundry_lite.training.schema\n"
            "try:\n"
            "    llmfoundry_lite.train('no_such.yaml')\n"
            "except UserError as e:\n"
            "    print('refused', 'no_such.yaml' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:3] == ["refused True"] * 3, out
