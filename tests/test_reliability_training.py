"""Faults in training lose nothing: non-finite steps are skipped and a failing run stops with its last
good weights saved; partial and corrupt checkpoints are never resumed from; a planted checkpoint runs
no code; another model's checkpoint is named; a save_folder that cannot take a checkpoint is refused
before training; a really full disk is a clear error that keeps the previous checkpoint."""
import json
import os
import shutil
import sys

import pytest
import torch

from llmfoundry_lite import cli
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export import checksums
from llmfoundry_lite.training.checkpoints import CORRUPT, INCOMPLETE, LATEST, is_complete, prepare_autoresume

import fault_injection  # noqa: F401  (registers the `fault_injection` callback)
from mounts import in_private_mounts, small_disk
from train_utils import tiny_overrides, write_copy_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_YAML = os.path.join(ROOT, "yamls", "pretrain", "mpt-tiny-cpu.yaml")

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory):
    return write_copy_task(str(tmp_path_factory.mktemp("copy_task")), n_train=128, n_val=16)


def _overrides(copy_data, tokenizer, tmp_path, name, **extra):
    data = str(tmp_path / f"data-{name}")
    if not os.path.exists(data):  # streaming refuses two live datasets on one local folder
        shutil.copytree(copy_data, data)
    # one process without fsdp_config: whole-model `.pt` checkpoints (sharded ones: test_reliability_kill.py)
    return tiny_overrides(data, tokenizer, **{"run_name": name, "save_folder": str(tmp_path / name),
                                              "fsdp_config": "null", **extra})


def _train(overrides):
    from llmfoundry_lite import train
    trainer = train(TINY_YAML, overrides)
    trainer.close()
    return trainer


SNAPSHOTS = {}  # batch number -> the weights after that batch, filled by the `snapshots` callback


def _snapshot_callback():
    from composer.core import Callback

    class Snapshots(Callback):
        def batch_end(self, state, logger):
            SNAPSHOTS[state.timestamp.batch.value] = {k: v.detach().clone()
                                                      for k, v in state.model.model.state_dict().items()}
    return Snapshots()


@pytest.fixture
def snapshots():
    from llmfoundry_lite import registry
    SNAPSHOTS.clear()
    if "snapshots" not in registry.callbacks:
        registry.callbacks.register("snapshots", _snapshot_callback)
    return SNAPSHOTS


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_step_is_skipped_and_training_goes_on(copy_data, tiny_tokenizer_dir, tmp_path, monkeypatch,
                                                        snapshots):
    monkeypatch.setenv("LLMF_FAULT", "nan_grads:0:4")
    trainer = _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "skip", max_duration="6ba",
                                save_folder="null", **{"callbacks.fault_injection": "{}", "callbacks.snapshots": "{}"}))
    assert _equal(snapshots[4], snapshots[3])            # batch 4's step was not applied
    assert not _equal(snapshots[5], snapshots[4]) and not _equal(snapshots[3], snapshots[2])
    assert all(torch.isfinite(v).all() for v in snapshots[6].values())
    opt = trainer.state.optimizers[0]
    assert {int(s["step"]) for s in opt.state.values()} == {5}  # 6 batches, 5 optimizer updates


def test_repeated_nonfinite_steps_stop_with_last_good_weights_saved(copy_data, tiny_tokenizer_dir, tmp_path,
                                                                    monkeypatch, snapshots):
    from llmfoundry_lite.training.callbacks import TrainingDiverged
    monkeypatch.setenv("LLMF_FAULT", "nan_grads:0:3,4,5")
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "stop", max_duration="8ba", save_interval="100ba",
                      **{"callbacks.fault_injection": "{}", "callbacks.snapshots": "{}",
                         "callbacks.loss_spike_guard.max_nonfinite_steps": "3"})
    with pytest.raises(TrainingDiverged, match=r"3 steps in a row .*batches 3-5.*last good weights is in"):
        _train(args)
    assert max(snapshots) == 5                            # stopped right after the third skipped step
    saved = torch.load(tmp_path / "stop" / LATEST, weights_only=False)["state"]["model"]
    good = snapshots[2]
    assert _equal({k: saved["model." + k] for k in good}, good)
    assert saved is not None and os.path.realpath(tmp_path / "stop" / LATEST).endswith("ep0-ba5-rank0.pt")
    # the fixed run resumes from there and finishes
    monkeypatch.delenv("LLMF_FAULT")
    assert _train(args).state.timestamp.batch.value == 8


@pytest.fixture(scope="module")
def straight_weights(copy_data, tiny_tokenizer_dir, tmp_path_factory):
    """The weights of an uninterrupted 6-batch run (checkpoints every 2 batches)."""
    trainer = _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path_factory.mktemp("straight"), "straight",
                                max_duration="6ba", save_interval="2ba"))
    return trainer.state.model.model.state_dict()


def _stopped_at_4(copy_data, tokenizer, tmp_path, name):
    """A run to 6 batches (checkpoints every 2) that stopped after batch 4: (its overrides, its save_folder)."""
    args = _overrides(copy_data, tokenizer, tmp_path, name, max_duration="6ba", save_interval="2ba",
                      python_log_level="info", save_num_checkpoints_to_keep=-1)
    _train(args + ["max_duration=4ba"])  # the last override wins
    return args, tmp_path / name


def _checkpoint_names(folder):
    return sorted(n for n in os.listdir(folder) if not n.endswith(checksums.SUFFIX))


def test_partial_checkpoints_are_set_aside_and_never_resumed(copy_data, tiny_tokenizer_dir, tmp_path, caplog,
                                                             straight_weights):
    """A run that stopped at 4 (checkpoints 2 and 4), whose newest checkpoint is then cut in half and
    whose symlink is gone (a kill at the worst moment), relaunched to 6, equals the straight run."""
    args, folder = _stopped_at_4(copy_data, tiny_tokenizer_dir, tmp_path, "crashed")
    newest = folder / "ep0-ba4-rank0.pt"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    os.unlink(folder / LATEST)
    assert not is_complete(str(newest)) and is_complete(str(folder / "ep0-ba2-rank0.pt"))
    with caplog.at_level("INFO", logger="llmfoundry_lite"):
        resumed = _train(args)
    assert "not written to the end" in caplog.text and "ep0-ba2-rank0.pt at batch 2" in caplog.text
    assert len(_checkpoint_names(folder / INCOMPLETE)) == 1      # kept, not deleted
    assert _equal(straight_weights, resumed.state.model.model.state_dict())


def _damage_tensor_bytes(path):
    """Overwrite bytes in the middle of the largest tensor of a `.pt` (torch stores zip records
    uncompressed, each after a 30-byte local header, its name and extra field): the zip index stays intact."""
    import zipfile
    with zipfile.ZipFile(path) as zf:
        record = max(zf.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(record.header_offset + 30 + name_len + extra_len + record.file_size // 2)
        f.write(b"\xff" * 64)                               # NaNs in the middle of a tensor
    assert is_complete(str(path))                           # what the completeness check alone accepts


def test_corrupt_checkpoint_is_set_aside_and_the_previous_one_resumed(copy_data, tiny_tokenizer_dir, tmp_path,
                                                                      caplog, capsys, straight_weights):
    """Damaged tensor bytes in the newest checkpoint (its zip index intact): the relaunch finds them by
    the checksum manifest written at save time, sets the checkpoint aside, resumes from the one before
    and ends with the straight run's weights. The damaged checkpoint as load_path: exit 2 naming it."""
    args, folder = _stopped_at_4(copy_data, tiny_tokenizer_dir, tmp_path, "damaged")
    for name in ("ep0-ba2-rank0.pt", "ep0-ba4-rank0.pt"):   # each checkpoint's manifest holds its real hash
        import xxhash
        manifest = json.loads((folder / (name + checksums.SUFFIX)).read_text())
        assert manifest["files"][name]["xxh3_128"] == xxhash.xxh3_128((folder / name).read_bytes()).hexdigest()
    _damage_tensor_bytes(folder / "ep0-ba4-rank0.pt")
    with caplog.at_level("INFO", logger="llmfoundry_lite"):
        resumed = _train(args)
    assert "ep0-ba4-rank0.pt is corrupt" in caplog.text and "other bytes than were written" in caplog.text
    assert "ep0-ba2-rank0.pt at batch 2" in caplog.text
    assert [n.split(".pt")[0] for n in _checkpoint_names(folder / CORRUPT)] == ["ep0-ba4-rank0"]
    assert _equal(straight_weights, resumed.state.model.model.state_dict())
    damaged = folder / CORRUPT / _checkpoint_names(folder / CORRUPT)[0]
    capsys.readouterr()
    assert cli.main(["train", TINY_YAML, *args, "save_folder=null", f"load_path={damaged}"]) == 2
    err = capsys.readouterr().err
    assert f"load_path {damaged} is corrupt" in err and "other bytes than were written" in err and "Traceback" not in err


def test_manifests_follow_checkpoint_rotation(copy_data, tiny_tokenizer_dir, tmp_path):
    _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "keep1", max_duration="4ba", save_interval="1ba",
                      save_num_checkpoints_to_keep=1))
    assert sorted(os.listdir(tmp_path / "keep1")) == ["ep0-ba4-rank0.pt", "ep0-ba4-rank0.pt" + checksums.SUFFIX,
                                                     LATEST]


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_planted_checkpoint_runs_no_code_on_autoresume_or_load_path(copy_data, tiny_tokenizer_dir, tmp_path,
                                                                    capsys):
    """A newer `.pt` planted in save_folder (a real checkpoint with a code-running object added) is the
    one autoresume picks: exit 2 naming it, nothing executed; the same file as load_path, too."""
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "planted", max_duration="2ba", save_interval="2ba")
    _train(args)
    folder, marker = tmp_path / "planted", tmp_path / "PWNED"
    ckpt = torch.load(folder / "ep0-ba2-rank0.pt", weights_only=False)
    ckpt["state"]["callbacks"]["Payload"] = Payload(marker)
    torch.save(ckpt, folder / "ep0-ba9-rank0.pt")
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder) if not (folder / n).is_symlink()}
    for extra in ([], ["save_folder=null", f"load_path={folder / 'ep0-ba9-rank0.pt'}"]):
        assert cli.main(["train", TINY_YAML, *args, "max_duration=4ba", *extra]) == 2
        err = capsys.readouterr().err
        assert "ep0-ba9-rank0.pt holds pickled objects" in err and "could run arbitrary code" in err
        assert "Traceback" not in err and not marker.exists()
    assert {n: (folder / n).read_bytes() for n in before} == before


def test_checkpoint_of_another_model_in_save_folder_is_named(copy_data, tiny_tokenizer_dir, tmp_path, capsys):
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "other", max_duration="2ba", save_interval="2ba")
    _train(args)
    assert cli.main(["train", TINY_YAML, *args, "max_duration=4ba", "model.d_model=64"]) == 2
    err = capsys.readouterr().err
    assert "size mismatch" in err and "a run of another model wrote" in err and "Traceback" not in err


def test_prepare_autoresume_on_sharded_folders(tmp_path):
    for name, files in {"ep0-ba3": ["__0_0.distcp", "__1_0.distcp", ".metadata"],
                        "ep0-ba6": ["__0_0.distcp"], "ep0-ba9": []}.items():
        os.makedirs(tmp_path / name)
        for f in files:
            (tmp_path / name / f).write_bytes(b"x")
    os.symlink("ep0-ba6", tmp_path / LATEST)                # pointing at an incomplete one
    assert prepare_autoresume(str(tmp_path)) == str(tmp_path / "ep0-ba3")
    assert os.readlink(tmp_path / LATEST) == "ep0-ba3"
    assert sorted(os.listdir(tmp_path)) == ["ep0-ba3", "ep0-ba9", INCOMPLETE, LATEST]  # ba9 holds no checkpoint
    assert prepare_autoresume(str(tmp_path / "missing")) is None


def test_unwritable_or_full_save_folder_is_refused_before_training(copy_data, tiny_tokenizer_dir, tmp_path,
                                                                   monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is not writable"):
        _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "x", save_folder=str(blocker / "ckpt")))

    import llmfoundry_lite.training.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"has 0 MiB free, but one checkpoint needs about"):
        _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "y"))


def test_full_disk_while_saving_is_a_clear_error(copy_data, tiny_tokenizer_dir, tmp_path):
    """A real full filesystem: room for one full checkpoint, not two. The second save fails: exit 2,
    'disk full', no traceback; the first checkpoint is intact (its manifest still matches), and the
    relaunch on a disk with room again resumes from it."""
    folder = tmp_path / "small"
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "full", max_duration="4ba", save_interval="2ba",
                      save_folder=str(folder), python_log_level="info")
    probe = tmp_path / "probe"
    _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "probe", max_duration="2ba", save_interval="2ba",
                      save_folder=str(probe)))
    one = sum(os.path.getsize(probe / n) for n in os.listdir(probe) if not (probe / n).is_symlink())
    write_at_end = tmp_path / "copy"
    # the tmpfs lives only inside the namespace: copy what the run left there, to look at it afterwards
    proc = in_private_mounts(small_disk(folder, int(one * 1.5)), [
        "sh", "-c", f'"$@"; rc=$?; cp -a {folder} {write_at_end}; exit $rc', "sh",
        sys.executable, "-m", "llmfoundry_lite.cli", "train", TINY_YAML, *args])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "disk full" in proc.stderr and str(folder) in proc.stderr and "Traceback" not in proc.stderr
    assert checksums.verify(str(write_at_end / "ep0-ba2-rank0.pt")) == ([], [])
    assert not is_complete(str(write_at_end / "ep0-ba4-rank0.pt"))
    assert _train(args + [f"save_folder={write_at_end}"]).state.timestamp.batch.value == 4


def test_loss_spikes_are_logged_and_stop_the_run(copy_data, tiny_tokenizer_dir, tmp_path, caplog):
    from llmfoundry_lite.training.callbacks import TrainingDiverged
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "spikes", max_duration="6ba", save_folder="null",
                      **{"callbacks.loss_spike_guard.loss_cap": "0.5", "callbacks.loss_spike_guard.patience": "3"})
    with caplog.at_level("WARNING", logger="llmfoundry_lite"), \
            pytest.raises(TrainingDiverged, match="loss spiked 3 batches in a row .* at batch 3"):
        _train(args)
    assert caplog.text.count("loss spike at batch") == 3


def test_hf_checkpointer_refuses_a_folder_it_did_not_write(copy_data, tiny_tokenizer_dir, tmp_path, capsys):
    """A `ba2` folder of someone else's in hf_checkpointer's save_folder: exit 2 before training, nothing
    changed; `overwrite: true` (llm-foundry's key) writes the export there and keeps their other files."""
    hf = tmp_path / "hf"
    (hf / "ba2").mkdir(parents=True)
    (hf / "ba2" / "model.safetensors").write_bytes(b"their weights")
    (hf / "ba2" / "notes.txt").write_text("theirs")
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "hfc", max_duration="2ba", save_folder="null",
                      **{"callbacks.hf_checkpointer.save_folder": str(hf),
                         "callbacks.hf_checkpointer.save_interval": "2ba"})
    assert cli.main(["train", TINY_YAML, *args]) == 2
    err = capsys.readouterr().err
    assert str(hf / "ba2") in err and "hf_checkpointer.overwrite: true" in err and "Traceback" not in err
    assert sorted(os.listdir(hf / "ba2")) == ["model.safetensors", "notes.txt"]
    assert (hf / "ba2" / "model.safetensors").read_bytes() == b"their weights"
    _train(args + ["callbacks.hf_checkpointer.overwrite=true"])
    assert (hf / "ba2" / "notes.txt").read_text() == "theirs" and (hf / "ba2" / "config.json").exists()
    assert (hf / "ba2" / "model.safetensors").read_bytes() != b"their weights"
