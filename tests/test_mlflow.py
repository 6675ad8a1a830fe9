"""The `mlflow` logger against a real MLflow tracking server (the `mlflow_server` fixture, a separate
process): a run's losses arrive step by step as it logged them, and an autoresumed run continues the
same MLflow run. Training runs in this process."""
import sys

import pytest

from llmfoundry_lite import registry
from llmfoundry_lite.errors import UserError

from train_utils import ROW, fresh_copy, read_losses, run, tiny_overrides, write_copy_task

pytestmark = pytest.mark.usefixtures("torch_one_thread")

EXPERIMENT = "llmfoundry-lite-tests"
RUN = "mlflow-tiny"          # the Composer run_name: the tag `resume` searches by
MLFLOW_RUN = "tiny-in-mlflow"  # loggers.mlflow.run_name: the MLflow run's display name


@pytest.fixture(scope="module")
def resumed(mlflow_server, tiny_tokenizer_dir, tmp_path_factory):
    """A run trained to 3 batches, then the same command with max_duration 6ba (autoresume from its
    save_folder), logging to MLflow and to a jsonl file. Returns (client, the experiment's runs and the
    loss history of its first run after the first part, its runs after both, the jsonl path, the second
    part's MLflow logger)."""
    from mlflow.tracking import MlflowClient
    tmp = tmp_path_factory.mktemp("mlflow_run")
    data = write_copy_task(str(tmp / "copy"), n_train=128, n_val=16)

    def part(duration):
        return run(*tiny_overrides(fresh_copy(data, tmp, f"data-{duration}"), tiny_tokenizer_dir, **{
            "max_duration": duration, "run_name": RUN, "save_folder": str(tmp / "ckpt"), "save_interval": "3ba",
            "loggers.jsonl.path": str(tmp / "m.jsonl"), "loggers.mlflow.tracking_uri": mlflow_server,
            "loggers.mlflow.experiment_name": EXPERIMENT, "loggers.mlflow.run_name": MLFLOW_RUN}))

    client = MlflowClient(mlflow_server)

    def runs():
        experiment = client.get_experiment_by_name(EXPERIMENT)
        return client.search_runs([experiment.experiment_id]) if experiment else []

    # Composer's logger sets MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS in os.environ: put back what was there
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "10")
        mp.setenv("NODENAME", "first-node")
        assert part("3ba").state.timestamp.batch.value == 3
        first = runs()
        first_history = history(client, first[0].info.run_id) if first else None
        mp.setenv("NODENAME", "another-node")  # a hyperparameter Composer logs, changed on resume
        with pytest.warns(UserWarning, match=r"keeps its logged values of \['node_name'\]"):
            second = part("6ba")
        assert second.state.timestamp.batch.value == 6
    logger = next(d for d in second.logger.destinations if isinstance(d, registry.loggers.get("mlflow")))
    return client, (first, first_history), runs(), str(tmp / "m.jsonl"), logger


def history(client, run_id):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, "loss/train/total"),
                                              key=lambda m: m.step)]


def test_losses_reach_mlflow_step_by_step_and_autoresume_continues_the_run(resumed):
    client, (first, first_history), both, jsonl, _ = resumed
    losses = read_losses(jsonl)                        # what the run itself logged, both parts
    assert [step for step, _ in losses] == [0, 1, 2, 3, 4, 5]
    assert len(first) == 1 and first[0].info.run_name == MLFLOW_RUN and first[0].data.tags["run_name"] == RUN
    assert first_history == losses[:3]                 # exact: both are the float of the same tensor
    assert len(both) == 1 and both[0].info.run_id == first[0].info.run_id, "autoresume started another MLflow run"
    run_ = both[0]
    assert run_.info.status == "FINISHED"
    assert history(client, run_.info.run_id) == losses


def test_params_hold_what_composer_logs(resumed):
    client, _, (run_,), _, _ = resumed
    params = run_.data.params
    assert params["rank_zero_seed"] == "17" and params["mlflow_run_id"] == run_.info.run_id
    assert params["mlflow_experiment_id"] == run_.info.experiment_id
    # the resumed part's NODENAME differs: the first value stays (MLflow refuses a change and, logging
    # asynchronously, would drop the whole batch with it: the resumed part's losses)
    assert params["node_name"] == "first-node"
    assert {"composer_version", "composer_commit_hash", "num_nodes", "num_cpus_per_node"} <= set(params)


def test_post_close_runs_once(resumed, monkeypatch):
    """Composer's engine calls post_close again at exit for a Trainer still referenced (as here): the
    tracking server may be gone by then (the fixture stops it), so the second call must not reach it."""
    logger = resumed[4]

    def unreachable(*args, **kwargs):
        raise AssertionError("post_close asked the tracking server again")
    monkeypatch.setattr(logger._mlflow_client, "get_run", unreachable)
    logger.post_close()


def test_params_include_the_run_config(resumed):
    params = resumed[2][0].data.params
    assert params.get("global_train_batch_size") == "16" and params.get("max_seq_len") == str(ROW), sorted(params)
    assert params["optimizer.name"] == "decoupled_adamw" and params["loggers.mlflow.experiment_name"] == EXPERIMENT
    assert params["max_duration"] == "3ba"  # MLflow never changes a param: the first part's value stays


def test_mlflow_section_is_composers_logger_with_resume_on():
    import dataclasses

    from composer.loggers import MLFlowLogger
    cls = registry.loggers.get("mlflow")
    assert issubclass(cls, MLFlowLogger)
    fields = {f.name: f.default for f in dataclasses.fields(registry.loggers.config_of("mlflow"))}
    assert fields["resume"] is True and fields["model_registry_uri"] is None and fields["tracking_uri"] is None
    assert {"experiment_name", "run_name", "tags", "synchronous", "ignore_metrics"} <= set(fields)


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'llmfoundry-lite\[mlflow\]'"):
        registry.loggers.get("mlflow")(tracking_uri="http://127.0.0.1:9", experiment_name="x")
