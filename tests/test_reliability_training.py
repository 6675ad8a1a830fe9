"""Faults in training lose nothing: non-finite steps are skipped and a failing run stops with its last
good weights saved; partial checkpoints are never resumed from; a save_folder that cannot take a
checkpoint is refused before training; a full disk is a clear error."""
import errno
import os
import shutil

import pytest
import torch

from llmfoundry_lite.errors import UserError
from llmfoundry_lite.train.checkpoints import INCOMPLETE, LATEST, is_complete, prepare_autoresume

import fault_injection  # noqa: F401  (registers the `fault_injection` callback)
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
    return tiny_overrides(data, tokenizer, **{"run_name": name, "save_folder": str(tmp_path / name), **extra})


def _train(overrides):
    from llmfoundry_lite.train import train
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
    from llmfoundry_lite.train.callbacks import TrainingDiverged
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


def test_partial_checkpoints_are_set_aside_and_never_resumed(copy_data, tiny_tokenizer_dir, tmp_path, caplog):
    """A full run to 6 batches vs one that stopped at 4 (checkpoints 2 and 4), whose newest checkpoint
    is then cut in half and whose symlink is gone (a kill at the worst moment), relaunched to 6."""
    straight = _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "straight", max_duration="6ba",
                                 save_interval="2ba"))
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "crashed", max_duration="6ba", save_interval="2ba",
                      python_log_level="info", save_num_checkpoints_to_keep=-1)
    _train(args + ["max_duration=4ba"])  # the last override wins
    folder = tmp_path / "crashed"
    newest = folder / "ep0-ba4-rank0.pt"
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    os.unlink(folder / LATEST)
    assert not is_complete(str(newest)) and is_complete(str(folder / "ep0-ba2-rank0.pt"))
    with caplog.at_level("INFO", logger="llmfoundry_lite"):
        resumed = _train(args)
    assert "not written to the end" in caplog.text and "ep0-ba2-rank0.pt at batch 2" in caplog.text
    assert len(os.listdir(folder / INCOMPLETE)) == 1      # kept, not deleted
    assert _equal(straight.state.model.model.state_dict(), resumed.state.model.model.state_dict())


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

    import llmfoundry_lite.train.checkpoints as checkpoints
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError, match=r"has 0 MiB free, but one checkpoint needs about"):
        _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "y"))


def test_disk_full_while_saving_is_a_clear_error(copy_data, tiny_tokenizer_dir, tmp_path, monkeypatch):
    from composer.utils import checkpoint

    from llmfoundry_lite.errors import CheckpointError

    def full(state_dict, filename):
        raise OSError(errno.ENOSPC, "No space left on device", filename)
    monkeypatch.setattr(checkpoint, "_write_checkpoint_file", full)
    with pytest.raises(CheckpointError, match="filled up while writing a checkpoint"):
        _train(_overrides(copy_data, tiny_tokenizer_dir, tmp_path, "full", max_duration="2ba", save_interval="1ba"))


def test_loss_spikes_are_logged_and_stop_the_run(copy_data, tiny_tokenizer_dir, tmp_path, caplog):
    from llmfoundry_lite.train.callbacks import TrainingDiverged
    args = _overrides(copy_data, tiny_tokenizer_dir, tmp_path, "spikes", max_duration="6ba", save_folder="null",
                      **{"callbacks.loss_spike_guard.loss_cap": "0.5", "callbacks.loss_spike_guard.patience": "3"})
    with caplog.at_level("WARNING", logger="llmfoundry_lite"), \
            pytest.raises(TrainingDiverged, match="loss spiked 3 batches in a row .* at batch 3"):
        _train(args)
    assert caplog.text.count("loss spike at batch") == 3
