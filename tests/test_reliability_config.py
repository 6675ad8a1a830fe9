"""Bad training configs: the broken-config corpus (tests/broken_configs/) and property-based fuzzing
of the loader. Every bad config ends in a `UserError` naming the key; through the CLI it is exit
code 2 with `error:` and no traceback; nothing is silently ignored."""
import copy
import dataclasses
import glob
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfoundry_lite import cli
from llmfoundry_lite.compat.hf import PRETRAINED_CONFIG_KEYS
from llmfoundry_lite.config import load_config
from llmfoundry_lite.errors import ConfigError, UserError
from llmfoundry_lite.training.schema import TrainConfig, check_train_config

from train_utils import stand_in_folders

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "broken_configs")
BASE_YAML = os.path.join(CORPUS, "_base.yaml.txt")
CASES = sorted(glob.glob(os.path.join(CORPUS, "*.yaml")))


@pytest.fixture(autouse=True, scope="module")
def _in_folder_with_the_named_paths(tmp_path_factory):
    """The corpus names ./data (an MDS split) and ./tokenizer, which the config check looks for."""
    cwd = os.getcwd()
    os.chdir(stand_in_folders(str(tmp_path_factory.mktemp("cwd")), splits=["data/train"], folders=["tokenizer"]))
    yield
    os.chdir(cwd)


def header(path):
    """(expected fragments, world size, overrides) from the `# key: value` lines of a corpus file."""
    expects, world_size, overrides = [], 1, []
    with open(path) as f:
        for line in f:
            if not line.startswith("# "):
                break
            key, _, value = line[2:].rstrip("\n").partition(": ")
            if key == "expect":
                expects.append(value)
            elif key == "world_size":
                world_size = int(value)
            elif key == "overrides":
                overrides = value.split()
    return expects, world_size, overrides


def check(source, overrides=(), world_size=1):
    return check_train_config(load_config(source, overrides), world_size=world_size)


def test_corpus_is_complete_and_its_base_is_valid():
    assert all(header(p)[0] for p in CASES), "every corpus file names what the error must say"
    check(load_config(BASE_YAML))  # so each case fails because of its own mistake


@pytest.mark.parametrize("path", CASES, ids=lambda p: os.path.basename(p)[:-5])
def test_broken_config_is_refused_with_a_precise_message(path):
    expects, world_size, overrides = header(path)
    with pytest.raises(UserError) as err:
        check(path, overrides, world_size)
    message = str(err.value)
    missing = [e for e in expects if e not in message]
    assert not missing, f"{missing} not in:\n{message}"


@pytest.mark.parametrize("path", [p for p in CASES if header(p)[1] == 1], ids=lambda p: os.path.basename(p)[:-5])
def test_cli_exits_2_without_traceback(path, capsys):
    expects, _, overrides = header(path)
    assert cli.main(["train", path, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert expects[0] in err


def test_script_wrapper_exit_code(monkeypatch, capsys):
    """`scripts/train.py` (cli.entry) turns the same error into the process exit status 2."""
    monkeypatch.setattr("sys.argv", ["train.py", os.path.join(CORPUS, "typo_model.yaml")])
    with pytest.raises(SystemExit) as stop:
        cli.entry("train")
    assert stop.value.code == 2 and "model.n_layer: unknown key" in capsys.readouterr().err


def test_missing_config_file(capsys):
    assert cli.main(["train", os.path.join(CORPUS, "no_such.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


# ---- property-based fuzzing ---------------------------------------------------------------------

BASE = load_config(BASE_YAML)
TOP_LEVEL_KEYS = {"variables", *(f.name for f in dataclasses.fields(TrainConfig))}
# Mappings whose keys are not ours to check: passed through to another library as **kwargs.
FREE_FORM = {("tokenizer", "kwargs"), ("variables",), ("compile_config",)}
REQUIRED = {("max_seq_len",), ("model",), ("tokenizer",), ("train_loader",), ("max_duration",),
            ("global_train_batch_size",), ("model", "name"), ("tokenizer", "name"), ("train_loader", "name"),
            ("optimizer", "name"), ("scheduler", "name"), ("train_loader", "dataset")}
scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=6)


def mappings(node, path=()):
    """Every (path, mapping) in a config."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from mappings(v, path + (k,))


def dotted(path):
    return ".".join(map(str, path))


def run_check(cfg):
    """None when the config is accepted, else the UserError; any other exception fails the test."""
    try:
        check(cfg)
    except UserError as e:
        return e
    return None


SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=st.data(), value=values)
def test_fuzz_replacing_a_value_never_crashes(data, value):
    cfg = copy.deepcopy(BASE)
    path, node = data.draw(st.sampled_from([m for m in mappings(cfg) if m[1]]))
    key = data.draw(st.sampled_from(sorted(node)))
    node[key] = value
    run_check(cfg)


@SETTINGS
@given(data=st.data(), key=st.text(min_size=1, max_size=12), value=values)
def test_fuzz_unknown_key_at_any_depth_is_reported(data, key, value):
    cfg = copy.deepcopy(BASE)
    path, node = data.draw(st.sampled_from([m for m in mappings(cfg) if m[0] not in FREE_FORM]))
    # a real key, just not in the base config (the model's accept transformers' config keys too)
    real = TOP_LEVEL_KEYS if path == () else PRETRAINED_CONFIG_KEYS if path in (("model",), ("model", "attn_config")) else ()
    if key in node or key in real:
        return
    node[key] = value
    err = run_check(cfg)
    assert isinstance(err, ConfigError), f"unknown key {dotted(path + (key,))!r} was accepted"
    assert f"{dotted(path + (key,))}: unknown" in str(err) or "cannot read config" in str(err), str(err)


@SETTINGS
@given(data=st.data())
def test_fuzz_misspelt_or_deleted_key_is_reported(data):
    cfg = copy.deepcopy(BASE)
    path, node = data.draw(st.sampled_from([m for m in mappings(cfg) if m[1] and m[0] not in FREE_FORM]))
    key = data.draw(st.sampled_from(sorted(node)))
    value = node.pop(key)
    if data.draw(st.booleans()):
        typo = key[:-1] if len(key) > 2 else key + "x"
        node[typo] = value
        err = run_check(cfg)
        # "unknown key" for a field, "unknown callback 'x'" for a registry name; a misspelt `name`
        # leaves the section's builder unknown, so the missing name is what gets reported
        expected = f"{dotted(path + ('name',))}: missing" if key == "name" else f"{dotted(path + (typo,))}: unknown"
        assert isinstance(err, ConfigError) and expected in str(err), str(err)
    else:
        err = run_check(cfg)
        if path + (key,) in REQUIRED:
            assert isinstance(err, UserError) and dotted(path + (key,)) in str(err), str(err)


@SETTINGS
@given(overrides=st.lists(st.text(max_size=20), max_size=3))
def test_fuzz_overrides_never_crash(overrides):
    try:
        check(BASE_YAML, overrides)
    except UserError:
        pass


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x00", b"", b"just a string", b"[1, 2", b"a: b: c"])
def test_unreadable_config_files(tmp_path, content, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    assert cli.main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_values_from_the_environment_are_never_echoed(monkeypatch, capsys):
    """`${oc.env:VAR}` reads a value (often a token) from the environment: a config check or a later
    error that would show the value shows '<from the environment>' instead."""
    secret = "hf_s3cr3t-token-42"
    monkeypatch.setenv("LLMF_TEST_TOKEN", secret)
    base = ["train", BASE_YAML]
    assert load_config(BASE_YAML, ["run_name=${oc.env:LLMF_TEST_TOKEN}"])["run_name"] == secret  # it is read
    assert load_config(BASE_YAML, ["run_name=${oc.env:LLMF_UNSET_VAR,null}"])["run_name"] is None
    for override, fragment in (("max_seq_len=${oc.env:LLMF_TEST_TOKEN}", "max_seq_len: expected"),
                               ("load_path=/ckpts/${oc.env:LLMF_TEST_TOKEN}/latest.pt", "load_path: checkpoint not found"),
                               ("precision=${oc.env:LLMF_TEST_TOKEN}", "precision")):
        assert cli.main([*base, override]) == 2
        err = capsys.readouterr().err
        assert fragment in err and "<from the environment>" in err and secret not in err, err
    assert cli.main([*base, "run_name=${oc.env:LLMF_UNSET_VAR}"]) == 2
    assert "Environment variable 'LLMF_UNSET_VAR' not found" in capsys.readouterr().err
