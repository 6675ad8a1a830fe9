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
