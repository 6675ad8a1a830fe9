"""Training against a real S3-compatible server (moto's, a separate process on loopback: tests/servers.py),
reached through S3_ENDPOINT_URL as MinIO or R2 are.

2 ranks (FSDP2, sharded checkpoints every 3 batches, data streamed from the bucket, checkpoints to it,
2 kept): one run is killed after a checkpoint's shards were uploaded and right before the pointer that
names it, relaunched (resumes from the previous checkpoint in the bucket), killed again mid-step and
relaunched: it ends with the losses, weights and bucket contents of a straight run. 1 process: a prefix
holding someone else's objects is refused, `load_path: s3://` resumes a run's state, a code-running
checkpoint planted in the bucket is refused, and the pre-flight names every unreachable remote within
seconds (exit 2)."""
import importlib.util
import json
import os
import time
import uuid

import boto3
import pytest
import torch
from omegaconf import OmegaConf

from llmfoundry_lite import stores, train
from llmfoundry_lite.cli import main
from llmfoundry_lite.errors import CheckpointError, UserError
from llmfoundry_lite.export.composer_checkpoint import POINTER

from train_utils import DRIVER, ROOT, TINY_YAML, launch, read_losses, run, tiny_overrides, write_copy_task


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):
    """A bucket holding the copy task's MDS splits under `data/`, and a private cache folder."""
    name = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    local = write_copy_task(str(tmp_path_factory.mktemp("data")), n_train=256, n_val=16)
    stores.upload_folder(local, f"s3://{name}/data")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFOUNDRY_LITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield f"s3://{name}"


def two_rank_command(store, tokenizer, run_dir, launch_no):
    overrides = tiny_overrides(str(run_dir), tokenizer, **{
        "train_loader.dataset.remote": f"{store}/data", "train_loader.dataset.local": str(run_dir / f"data{launch_no}"),
        "max_duration": "9ba", "global_train_batch_size": 8, "run_name": run_dir.name,
        "save_folder": f"{store}/ckpt/{{run_name}}", "save_interval": "3ba", "save_num_checkpoints_to_keep": 2,
        "python_log_level": "info", "fsdp_config.state_dict_type": "sharded",
        "loggers.jsonl.path": str(run_dir / "metrics.jsonl")})
    return [DRIVER, str(run_dir), TINY_YAML, *overrides, "callbacks.fault_injection={}"]


def checkpoints_in(prefix):
    return sorted({n.split("/")[0] for n in stores.names(prefix) if n.startswith("ep")})


def last_losses(run_dir):
    """step -> loss, the last value logged for each step (a relaunch logs the re-trained steps again)."""
    return dict(read_losses(os.path.join(run_dir, "metrics.jsonl")))


@pytest.mark.multiprocess
def test_killed_between_upload_and_pointer_resumes_from_the_bucket_exactly(store, tiny_tokenizer_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    launch(two_rank_command(store, tiny_tokenizer_dir, straight, 0), str(straight / "logs"))
    prefix = f"{store}/ckpt/crashed"

    launch(two_rank_command(store, tiny_tokenizer_dir, crashed, 1), str(crashed / "logs1"), fault="before_pointer:0:6")
    assert stores.read_text(f"{prefix}/{POINTER}").endswith("ckpt/crashed/ep0-ba3")
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(stores.names(f"{prefix}/ep0-ba6"))  # all uploaded

    log = launch(two_rank_command(store, tiny_tokenizer_dir, crashed, 2), str(crashed / "logs2"), fault="mid_step:1:8")
    assert f"-> {prefix}/ep0-ba3 at batch 3" in log
    assert "ep0-ba6 in" in log and "newer than its pointer" in log
    log = launch(two_rank_command(store, tiny_tokenizer_dir, crashed, 3), str(crashed / "logs3"))
    assert f"-> {prefix}/ep0-ba6 at batch 6" in log

    # save_num_checkpoints_to_keep: 2 rotates the bucket as in the straight run
    assert checkpoints_in(prefix) == checkpoints_in(f"{store}/ckpt/straight") == ["ep0-ba6", "ep0-ba9"]
    assert last_losses(crashed) == last_losses(straight) and len(last_losses(straight)) == 9
    a, b = torch.load(straight / "weights.pt"), torch.load(crashed / "weights.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not os.path.exists(os.path.join(ROOT, "s3:")), "a local folder named after the URI was created"


class Payload:
    """Unpickling this calls os.mkdir(marker): the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def one_process(store, tokenizer, tmp_path, **extra):
    """One process (FSDP2 over a world of one) saving whole-model `.pt` checkpoints."""
    values = {"train_loader.dataset.remote": f"{store}/data", "train_loader.dataset.local": str(tmp_path / "data"),
              "global_train_batch_size": 4, "save_interval": "1ba", "fsdp_config.state_dict_type": "full", **extra}
    return tiny_overrides(str(tmp_path), tokenizer, **values)


def test_bucket_prefixes_load_path_and_planted_checkpoints(store, tiny_tokenizer_dir, tmp_path, torch_one_thread):
    # a prefix with objects no training run of ours wrote is refused, and nothing there is touched
    stores.write_text(f"{store}/theirs/notes.txt", "keep me")
    with pytest.raises(UserError, match=r"theirs: holds notes.txt, which llmfoundry-lite's train did not write"):
        run(*one_process(store, tiny_tokenizer_dir, tmp_path / "a", run_name="theirs", max_duration="1ba",
                         save_folder=f"{store}/{{run_name}}"))
    assert stores.names(f"{store}/theirs") == ["notes.txt"]

    first = run(*one_process(store, tiny_tokenizer_dir, tmp_path / "b", run_name="full", max_duration="2ba",
                             save_folder=f"{store}/{{run_name}}"))
    assert {"ep0-ba2-rank0.pt", "ep0-ba2-rank0.pt.checksums.json", POINTER} <= set(stores.names(f"{store}/full"))
    assert first.state.timestamp.batch.value == 2
    staging = stores.local_mirror(f"{store}/full", "staging")  # only the newest stays there once uploaded
    assert sorted(n for n in os.listdir(staging) if n.startswith("ep")) == ["ep0-ba2-rank0.pt", "ep0-ba2-rank0.pt.checksums.json"]

    # load_path: the save_folder prefix (its pointer's checkpoint), downloaded, verified and loaded: the
    # run continues at batch 2 (a fresh start would train 3 batches) with the same optimizer steps
    loaded = run(*one_process(store, tiny_tokenizer_dir, tmp_path / "c", run_name="loads", max_duration="3ba",
                              load_path=f"{store}/full"))
    assert loaded.state.timestamp.batch.value == 3
    assert [p["step"] for p in loaded.state.optimizers[0].state.values()][0].item() == 3

    # an HF folder in the bucket (convert's export of that run) as the model and tokenizer to train from
    assert main(["convert", "--composer_path", f"{store}/full", "--hf_output_path", f"{store}/hf"]) == 0
    cfg = OmegaConf.to_container(OmegaConf.load(TINY_YAML))
    cfg.update(model={"name": "hf_causal_lm", "pretrained_model_name_or_path": f"{store}/hf"},
               tokenizer={"name": f"{store}/hf"})
    overrides = [o for o in one_process(store, tiny_tokenizer_dir, tmp_path / "e", run_name="from-hf",
                                        max_duration="1ba") if not o.startswith("model.")]
    from_hf = train(cfg, overrides)
    from_hf.close()
    assert from_hf.state.timestamp.batch.value == 1

    # a newer checkpoint planted in the bucket with a code-running entry: refused on autoresume
    local = stores.download(f"{store}/full/ep0-ba2-rank0.pt", str(tmp_path / "ba2.pt"))
    ckpt = torch.load(local, weights_only=False)
    ckpt["state"]["callbacks"]["Evil"] = Payload(tmp_path / "PWNED")
    torch.save(ckpt, tmp_path / "evil.pt")
    stores.upload(str(tmp_path / "evil.pt"), f"{store}/full/ep0-ba3-rank0.pt")
    stores.write_text(f"{store}/full/{POINTER}", stores.split(f"{store}/full/ep0-ba3-rank0.pt")[2])
    manifest = json.loads(stores.read_text(f"{store}/full/.llmfoundry_lite.json"))
    stores.write_text(f"{store}/full/.llmfoundry_lite.json",
                      json.dumps({**manifest, "files": manifest["files"] + ["ep0-ba3-rank0.pt"]}))
    with pytest.raises(CheckpointError, match="could run arbitrary code"):
        run(*one_process(store, tiny_tokenizer_dir, tmp_path / "d", run_name="full", max_duration="4ba",
                         save_folder=f"{store}/{{run_name}}"))
    assert not (tmp_path / "PWNED").exists()


def test_preflight_names_every_unreachable_remote_fast(store, tiny_tokenizer_dir, tmp_path, capsys, monkeypatch):
    overrides = one_process(store, tiny_tokenizer_dir, tmp_path, run_name="r", max_duration="1ba",
                            save_folder="s3://no-such-bucket-here/{run_name}", load_path=f"{store}/nothing/here.pt",
                            **{"train_loader.dataset.remote": f"{store}/never-prepared",
                               "loggers.mlflow.tracking_uri": "http://127.0.0.1:9"})
    start = time.monotonic()
    assert main(["train", TINY_YAML, *overrides]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert "cannot reach what the config names (4 problems)" in err and "Traceback" not in err
    assert f"train_loader.dataset.remote: {store}/never-prepared/train/index.json: not found: data prep did not " \
           "finish" in err
    assert "save_folder: s3://no-such-bucket-here/r: list failed: the bucket does not exist" in err
    assert f"load_path: {store}/nothing/here.pt: nothing there" in err
    assert "loggers.mlflow.tracking_uri: cannot reach the MLflow tracking server at http://127.0.0.1:9" in err

    # a store whose client is an extra that is not installed (Azure's libcloud is not in the tested venv)
    assert importlib.util.find_spec("libcloud") is None
    assert main(["train", TINY_YAML, *overrides[:-1], "save_folder=azure://container/{run_name}"]) == 2
    assert "save_folder: azure://container/r: azure:// needs the azure extra: pip install 'llmfoundry-lite[azure]'" \
        in capsys.readouterr().err

    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # the wrong endpoint: every s3 URI named
    start = time.monotonic()
    assert main(["train", TINY_YAML, *overrides[:-1]]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert err.count("cannot reach the store at http://127.0.0.1:9; check S3_ENDPOINT_URL") == 3, err
