"""The README works as written: every shell block runs (in order, in a scratch folder, with tiny
training lengths), blocks marked `# needs a GPU` / `# needs several machines` / `# needs a Slurm cluster` name files that exist,
the YAML reference lists every top-level key with its real default, the FSDP and plug-in snippets are
valid, and every recorded benchmark is referenced."""
import dataclasses
import os
import re
import socket
import subprocess
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
# Shrink the training runs; everything else runs exactly as written.
TINY = [(r"max_duration=\d+ba", "max_duration=4ba"), (r"eval_interval=\d+ba", "eval_interval=2ba")]
# What some commands must print (a substring of the block's output).
EXPECT = {
    "llmfoundry-lite generate": "tokens/s",
    "llmfoundry-lite chat": "Assistant:",
    "llmfoundry-lite serve": '[{"0":"the meaning of life is',
    "from openai import OpenAI": "chat:",
    "lm_eval --model local-completions": "|stdlib_choice|",
    "AutoModelForCausalLM": "MptForCausalLM",
    "llmfoundry-lite eval": "mpt-tiny-trained",
}
# `make quickstart` is tests/test_quickstart.py's command; `make test` is this suite.
COVERED_ELSEWHERE = ("make quickstart", "make test")


def blocks(lang):
    return [body for kind, body in BLOCK.findall(README) if kind == lang]


def needs_hardware(body: str) -> bool:
    """GPUs, several machines, or a Slurm cluster (tests/test_slurm.py submits that block to one; as a batch
    script it starts with its shebang)."""
    return body.removeprefix("#!/bin/bash\n").startswith(
        ("# needs a GPU", "# needs several machines", "# needs a Slurm cluster"))


def needs_llama_cpp(body: str) -> bool:
    """llama.cpp's bindings (tests/test_gguf_llamacpp.py runs that block) or its programs / Ollama."""
    return body.startswith("# needs llama")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.timeout(900)
def test_every_shell_block_runs(tmp_path, s3_server):
    """(`s3_server`: the object-store block runs against a real local S3-compatible server; the fixture
    sets S3_ENDPOINT_URL and credentials in the environment the blocks inherit.)"""
    for name in ("yamls", "scripts", "data_prep", "llmfoundry_lite", "README.md"):
        os.symlink(os.path.join(REPO, name), tmp_path / name)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "OMP_NUM_THREADS": "1", "LLMFOUNDRY_LITE_CACHE": str(tmp_path / "cache")}
    port = str(_free_port())
    ran = 0
    for body in blocks("bash"):
        if needs_hardware(body) or needs_llama_cpp(body) or any(c in body for c in COVERED_ELSEWHERE):
            continue
        script = body.replace("8080", port)
        for pattern, tiny in TINY:
            script = re.sub(pattern, tiny, script)
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=400)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README block failed:\n{body}\n--- output ---\n{output[-5000:]}"
        for key, expected in EXPECT.items():
            if key in body:
                assert expected in output, f"{key}: expected {expected!r} in\n{output[-3000:]}"
        ran += 1
    assert ran >= 10


def test_hardware_blocks_are_marked_and_name_real_files():
    marked = [b for b in blocks("bash") if needs_hardware(b)]
    assert len(marked) >= 3
    for body in marked:
        for path in re.findall(r"(?:yamls|scripts)/[\w./-]+", body):
            assert os.path.exists(os.path.join(REPO, path)), path
    # every other block is run by test_every_shell_block_runs, except the two covered elsewhere
    for body in blocks("bash"):
        if "composer" in body and "--world_size" in body:
            assert needs_hardware(body)


def _default_text(field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


def test_yaml_reference_lists_every_key_with_its_default():
    from llmfoundry_lite.training.schema import TrainConfig
    rows = dict(re.findall(r"^\| `(\w+)` \| `?([^|`]*?)`? \|", README, re.M))
    for field in dataclasses.fields(TrainConfig):
        assert field.name in rows, f"README YAML reference misses `{field.name}`"
        assert rows[field.name] == _default_text(field), (field.name, rows[field.name], _default_text(field))


def test_fsdp_and_plugin_snippets_are_valid():
    import yaml  # PyYAML comes with omegaconf

    from llmfoundry_lite import registry
    from llmfoundry_lite.config import NamedMap, check
    from llmfoundry_lite.config.schema import coerce
    from llmfoundry_lite.training.schema import FSDPSection

    fsdp_yaml = next(b for b in blocks("yaml") if "fsdp_config" in b)
    data = yaml.safe_load(fsdp_yaml)
    _, problems = check(FSDPSection, data["fsdp_config"], "fsdp_config")
    assert problems == []
    plugin = next(b for b in blocks("python") if "registry.callbacks.register" in b)
    if "print_loss" not in registry.callbacks:
        exec(compile(plugin, "README plug-in", "exec"), {})
    problems = []
    sections = coerce(NamedMap[registry.callbacks], {"print_loss": {"every": 5}}, "callbacks", problems)
    assert problems == [] and sections["print_loss"].build().every == 5
    coerce(NamedMap[registry.callbacks], {"print_loss": {"evry": 5}}, "callbacks", problems)
    assert problems == ["callbacks.print_loss.evry: unknown key (did you mean 'every'?)"]
    assert 'entry-points."llmfoundry_lite.plugins"' in README


def test_every_recorded_benchmark_is_referenced():
    results = os.path.join(REPO, "benchmarks", "results")
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if name.endswith(".md"):
            assert f"benchmarks/results/{name}" in README, f"README does not mention benchmarks/results/{name}"
