"""Untrusted checkpoints and model folders: nothing we load runs code (a malicious pickle that would
create a marker folder if executed, in every place a pickle can hide), and broken or mismatched files
(truncated, another model's shapes, impossible config values, path tricks) end in a clear UserError."""
import json
import os
import re
import shutil

import pytest
import torch

from llmfoundry_lite import cli
from llmfoundry_lite.errors import CheckpointError, UserError
from llmfoundry_lite.export import load_composer_checkpoint, load_hf_model, write_hf_folder
from llmfoundry_lite.models import MPTConfig, MPTForCausalLM

pytestmark = pytest.mark.usefixtures("torch_one_thread")


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def tiny_model(**kw):
    torch.manual_seed(0)
    return MPTForCausalLM(MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=64, **kw))


def composer_state(model, extra=None, tokenizer_files=None):
    """The dict layout of a Composer checkpoint of ComposerMPTCausalLM (see export/composer_checkpoint.py)."""
    hf = {"model": {"config": {"content": model.config.to_dict()}}, "tokenizer": tokenizer_files or {}}
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()},
             "integrations": {"huggingface": hf}, **(extra or {})}
    return {"state": state}


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a pickle in an untrusted file ran code"


def test_malicious_pickle_in_full_checkpoint_never_runs(tmp_path, marker, capsys):
    path = tmp_path / "evil.pt"
    torch.save(composer_state(tiny_model(), extra={"callbacks": Payload(marker)}), path)
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        load_composer_checkpoint(str(path))
    for argv in (["convert", "--composer_path", str(path), "--hf_output_path", str(tmp_path / "hf")],
                 ["generate", str(path), "--prompts", "hi", "--tokenizer", str(tmp_path)]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "could run arbitrary code" in err and "Traceback" not in err


def sharded_checkpoint(tmp_path, model, extra_state=None):
    """A DCP folder (as FSDP2 training writes) saved in this process without a process group."""
    import torch.distributed.checkpoint as dcp
    folder = tmp_path / "sharded" / "ep0-ba1"
    dcp.save(composer_state(model, extra_state), checkpoint_id=str(folder), no_dist=True)
    return folder


def test_sharded_checkpoint_loads_and_equals_the_model(tmp_path):
    model = tiny_model()
    loaded, _ = load_composer_checkpoint(str(sharded_checkpoint(tmp_path, model)))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


def test_malicious_pickle_in_sharded_entry_never_runs(tmp_path, marker):
    model = tiny_model()
    folder = sharded_checkpoint(tmp_path, model)
    evil = tmp_path / "evil"
    sharded_checkpoint(evil, model, extra_state={"integrations": {"huggingface": {
        "model": {"config": {"content": Payload(marker)}}}}})
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        load_composer_checkpoint(str(evil / "sharded" / "ep0-ba1"))
    # the same checkpoint with its index replaced by a malicious pickle
    with open(folder / ".metadata", "wb") as f:
        import pickle
        pickle.dump(Payload(marker), f)
    with pytest.raises(CheckpointError, match="refused"):
        load_composer_checkpoint(str(folder))


def test_tokenizer_file_names_cannot_escape(tmp_path):
    escape = tmp_path / "escaped"
    name = os.path.relpath(escape, "/tmp/x")  # '../..' up to / and down into tmp_path, from any temp folder depth
    for bad in (name, "/" + str(escape), ".."):
        path = tmp_path / "trick.pt"
        torch.save(composer_state(tiny_model(), tokenizer_files={bad: {"file_extension": ".json", "content": {}}}), path)
        with pytest.raises(CheckpointError, match="not a plain file name"):
            load_composer_checkpoint(str(path))
    assert not list(tmp_path.glob("escaped*"))


@pytest.mark.parametrize("cut", [0, 100, 0.5, -10])
def test_truncated_full_checkpoint(tmp_path, cut):
    path = tmp_path / "ckpt.pt"
    torch.save(composer_state(tiny_model()), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError, match="truncated"):
        load_composer_checkpoint(str(path))


def test_sharded_checkpoint_with_missing_or_cut_shard(tmp_path):
    folder = sharded_checkpoint(tmp_path, tiny_model())
    shard = next(folder.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(UserError):
        load_composer_checkpoint(str(folder))
    (folder / ".metadata").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="truncated"):
        load_composer_checkpoint(str(folder))


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError):
        load_composer_checkpoint(str(path))


@pytest.fixture
def hf_folder(tmp_path):
    return write_hf_folder(tiny_model().config, tiny_model().state_dict(), str(tmp_path / "hf"), log=lambda *_: None)


def test_truncated_safetensors(hf_folder):
    path = os.path.join(hf_folder, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    for cut in (len(data) // 2, 7):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with pytest.raises(CheckpointError):
            load_hf_model(hf_folder)


@pytest.mark.parametrize("change, fragment", [
    ({"d_model": 64}, "size mismatch"),      # another model's shapes
    ({"n_layers": 3}, "missing"),
    ({"n_layers": 1}, "unexpected"),
    ({"vocab_size": 128}, "size mismatch"),
])
def test_weights_of_another_shape(hf_folder, change, fragment):
    cfg_path = os.path.join(hf_folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(change)
    if "d_model" in change:
        cfg["n_heads"] = 4
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(CheckpointError, match=fragment):
        load_hf_model(hf_folder)


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("change, fragment", [
    ({"vocab_size": 128}, r"size mismatch \['transformer.wte.weight \(64, 32\) != model \(128, 32\)'\]"),
    ({"n_layers": 3}, r"missing \['transformer.blocks.2"),
    ({"n_layers": 1}, r"unexpected \['transformer.blocks.1"),
])
def test_composer_weights_of_another_shape(tmp_path, sharded, change, fragment, capsys):
    """A checkpoint whose weights disagree with its saved config: loading and converting name the weights
    (shapes of a sharded one come from its metadata) and write nothing."""
    model = tiny_model()
    hf = composer_state(model)["state"]["integrations"]["huggingface"]
    hf["model"]["config"]["content"].update(change)
    if sharded:
        path = str(sharded_checkpoint(tmp_path, model, extra_state={"integrations": {"huggingface": hf}}))
    else:
        path = str(tmp_path / "ckpt.pt")
        torch.save({"state": {**composer_state(model)["state"], "integrations": {"huggingface": hf}}}, path)
    with pytest.raises(CheckpointError, match=fragment):
        load_composer_checkpoint(path)
    assert cli.main(["convert", "--composer_path", path, "--hf_output_path", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert re.search(fragment, err) and "nothing was written" in err and "Traceback" not in err
    assert not list((tmp_path / "hf").glob("*.safetensors"))


@pytest.mark.parametrize("change", [{"n_heads": 3}, {"n_layers": -1}, {"vocab_size": 0}, {"max_seq_len": "long"},
                                    {"expansion_ratio": -2}, {"attn_config": {"attn_impl": "nope"}}])
def test_impossible_config_values(hf_folder, change):
    cfg_path = os.path.join(hf_folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(change)
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(UserError, match=next(iter(change))):
        load_hf_model(hf_folder)


def test_malicious_pytorch_bin_and_remote_code_never_run(hf_folder, marker):
    """A .bin weights file is a pickle, and config.json may point at custom code: neither runs."""
    os.remove(os.path.join(hf_folder, "model.safetensors"))
    torch.save({"transformer.wte.weight": Payload(marker)}, os.path.join(hf_folder, "pytorch_model.bin"))
    with pytest.raises(CheckpointError):
        load_hf_model(hf_folder)
    code_marker = str(marker) + "_code"
    with open(os.path.join(hf_folder, "evil_modeling.py"), "w") as f:
        f.write(f"import os\nos.mkdir({code_marker!r})\n")
    cfg_path = os.path.join(hf_folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["auto_map"] = {"AutoConfig": "evil_modeling.Config", "AutoModelForCausalLM": "evil_modeling.Model"}
    json.dump(cfg, open(cfg_path, "w"))
    shutil.copy(os.path.join(os.path.dirname(cfg_path), "config.json"), cfg_path + ".bak")
    with pytest.raises(CheckpointError):
        load_hf_model(hf_folder)
    assert not os.path.exists(code_marker)


def _evil_checkpoint(tmp_path, layout, marker):
    """A real checkpoint of tiny_model with a code-running object where Composer keeps callback state
    (no reader needs that entry: it must be refused all the same)."""
    model, extra = tiny_model(), {"callbacks": {"Evil": Payload(marker)}}
    if layout == "sharded":
        return str(sharded_checkpoint(tmp_path, model, extra_state=extra))
    path = tmp_path / "evil.pt"
    torch.save(composer_state(model, extra=extra), path)
    return str(path)


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_every_command_refuses_a_code_running_checkpoint(tmp_path, marker, capsys, layout, tiny_tokenizer_dir):
    """convert, generate (and so chat and serve, which open models the same way), eval and a LoRA adapter
    on it: exit 2 naming the file, no traceback, nothing executed, nothing written."""
    import yaml
    path = _evil_checkpoint(tmp_path, layout, marker)
    eval_yaml = tmp_path / "eval.yaml"
    eval_yaml.write_text(yaml.safe_dump({
        "max_seq_len": 32, "device": "cpu", "models": [{"model_name": "m", "load_path": path}],
        "icl_tasks": [{"label": "lm", "dataset_uri": str(tmp_path / "task.jsonl"), "icl_task_type": "language_modeling"}]}))
    (tmp_path / "task.jsonl").write_text(json.dumps({"context": "a", "continuation": "b"}) + "\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in (["convert", "--composer_path", path, "--hf_output_path", str(tmp_path / "hf")],
                 ["generate", path, "--prompts", "hi", "--tokenizer", tiny_tokenizer_dir],
                 ["eval", str(eval_yaml)]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "could run arbitrary code" in err and "Traceback" not in err, argv
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.fixture
def hook_env(monkeypatch):
    """Composer's validation hook variables unset, and restored after the test (the gate sets them in
    this process; a leftover one would reach every later run and its launched ranks)."""
    from llmfoundry_lite.export import safe_load
    for name in (safe_load.COMPOSER_HOOK, safe_load.NEXT_VALIDATOR):
        monkeypatch.setenv(name, "")  # recorded by monkeypatch, so restored at teardown
        monkeypatch.delenv(name)
    return monkeypatch


def test_composer_loads_checkpoints_only_through_the_gate(tmp_path, marker, hook_env):
    """What training resumes from is opened by Composer itself (autoresume, load_path, also after a
    download): with the gate installed, its full-checkpoint loader and its DCP reader refuse a
    code-running object in a `.pt`, in a shard file's entries and in `.metadata`."""
    import pickle

    import torch.distributed.checkpoint as dcp
    from composer.utils.checkpoint import FileSystemReaderWithValidation, safe_torch_load

    from llmfoundry_lite.export import safe_load
    from llmfoundry_lite.training.checkpoints import gate_composer_loading
    gate_composer_loading()
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        safe_torch_load(_evil_checkpoint(tmp_path, "full", marker))
    folder = _evil_checkpoint(tmp_path, "sharded", marker)
    with pytest.raises(dcp.api.CheckpointException) as wrapped:  # as DCP raises it on every rank
        dcp.load({"state": {"callbacks": {"Evil": None}}}, storage_reader=FileSystemReaderWithValidation(folder),
                 no_dist=True)
    assert "could run arbitrary code" in str(safe_load.refusal_inside(wrapped.value))
    with open(os.path.join(folder, ".metadata"), "wb") as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(CheckpointError, match="refused"):
        FileSystemReaderWithValidation(folder).read_metadata()


def test_a_validator_the_user_set_still_runs_after_ours(tmp_path, hook_env):
    from composer.utils.checkpoint import safe_torch_load

    from llmfoundry_lite.export import safe_load
    from llmfoundry_lite.training.checkpoints import gate_composer_loading
    hook_env.setenv(safe_load.COMPOSER_HOOK, f"{__name__}.refuse_everything")
    gate_composer_loading()
    path = tmp_path / "ok.pt"
    torch.save(composer_state(tiny_model()), path)
    with pytest.raises(ValueError, match="is invalid"):  # Composer's words when a validator says no
        safe_torch_load(str(path))


def refuse_everything(path, specs):
    return False


@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_corrupt_bytes_are_found_by_the_manifest(tmp_path, capsys, layout):
    """A checkpoint whose tensor bytes changed after its manifest was written is refused by convert,
    naming the file; without damage it converts."""
    from llmfoundry_lite.export import checksums
    model = tiny_model()
    if layout == "sharded":
        path = sharded_checkpoint(tmp_path, model)
        checksums.write_manifest(str(path), 0)
        victim = next(path.glob("*.distcp"))
    else:
        path = victim = tmp_path / "ckpt.pt"
        torch.save(composer_state(model), path)
        checksums.write_manifest(str(path), 0)
    assert cli.main(["convert", "--composer_path", str(path), "--hf_output_path", str(tmp_path / "ok")]) == 0
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF                                   # one flipped byte
    victim.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main(["convert", "--composer_path", str(path), "--hf_output_path", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert f"{victim.name} holds other bytes than were written" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists()


def test_code_running_lora_adapter_and_reference_model_are_refused(tmp_path, marker, capsys, tiny_tokenizer_dir,
                                                                   hf_folder):
    """A LoRA adapter folder (`--adapter`) and DPO's `--reference_model` whose `.bin` is a code-running
    pickle: exit 2, nothing executed."""
    from peft import LoraConfig, get_peft_model
    adapter = tmp_path / "adapter"
    get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["Wqkv"])).save_pretrained(
        str(adapter), safe_serialization=False)
    torch.save({"base_model.model.transformer.blocks.0.attn.Wqkv.lora_A.weight": Payload(marker)},
               adapter / "adapter_model.bin")
    os.remove(os.path.join(hf_folder, "model.safetensors"))
    torch.save({"transformer.wte.weight": Payload(marker)}, os.path.join(hf_folder, "pytorch_model.bin"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    clean = str(tmp_path / "clean")
    write_hf_folder(tiny_model().config, tiny_model().state_dict(), clean, log=lambda *_: None)
    for argv in (["generate", clean, "--adapter", str(adapter), "--prompts", "hi", "--tokenizer", tiny_tokenizer_dir],
                 ["data-prep", "preference", "--dataset", str(pairs), "--splits", "train", "--out_root",
                  str(tmp_path / "out"), "--tokenizer", tiny_tokenizer_dir, "--max_seq_len", "16",
                  "--reference_model", hf_folder]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "could run arbitrary code" in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()
