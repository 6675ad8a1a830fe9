"""Training config: every shipped YAML validates; every error is reported at once with its path;
builders (schedulers, Lion, FSDP mapping, meta init) behave as specified. No training here."""
import glob
import math
import os
import tempfile
import warnings

import pytest
import torch

from llmfoundry_lite.config import load_config
from llmfoundry_lite.errors import ConfigError
from llmfoundry_lite.training.schema import check_train_config

from train_utils import stand_in_folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = sorted(glob.glob(os.path.join(ROOT, "yamls", "pretrain", "*.yaml")) +
               glob.glob(os.path.join(ROOT, "yamls", "finetune", "*.yaml")))


DATA = stand_in_folders(tempfile.mkdtemp(), splits=["train"])  # the config check wants the data folder to exist


def minimal(**over):
    cfg = {
        "model": {"name": "mpt_causal_lm", "d_model": 32, "n_heads": 2, "n_layers": 2, "max_seq_len": 16},
        "tokenizer": {"name": "some/tokenizer"},
        "train_loader": {"name": "text", "dataset": {"local": DATA, "split": "train", "max_seq_len": 16}},
        "max_duration": "4ba", "max_seq_len": 16, "global_train_batch_size": 4,
    }
    cfg.update(over)
    return cfg


def problems_of(cfg, world_size=1):
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg, world_size)
    return e.value.problems, str(e.value)


def test_shipped_yamls_exist():
    names = {os.path.basename(p) for p in YAMLS}
    for size in ("tiny-cpu", "125m", "350m", "760m", "1b", "3b", "7b", "30b"):
        assert f"mpt-{size}.yaml" in names
    for name in ("mpt-7b-instruct.yaml", "mpt-7b-chat.yaml", "mpt-tiny-cpu-sft.yaml"):
        assert name in names


@pytest.mark.parametrize("path", YAMLS, ids=os.path.basename)
def test_every_shipped_yaml_validates(path, tmp_path, monkeypatch):
    monkeypatch.chdir(stand_in_folders(  # the data and model folders the YAMLs name, relative to the cwd
        str(tmp_path), splits=["my-copy-c4/train", "my-copy-c4/val", "quickstart_out/data/train",
                               "quickstart_out/data/val"], folders=["quickstart_out/tokenizer", "quickstart_out/hf"]))
    cfg = check_train_config(load_config(path), world_size=8 if "cpu" not in path else 2)
    if "pretrain" in path and "cpu" not in path:  # the MPT family's shape
        assert cfg.max_seq_len == 2048 and cfg.precision == "amp_bf16"
        assert cfg.model.config.attn_config.alibi is True
        assert cfg.fsdp_config.sharding_strategy == "FULL_SHARD"
        assert cfg.tokenizer.name == "EleutherAI/gpt-neox-20b"
        assert cfg.model.config.vocab_size == (50432 if ("7b" in path or "30b" in path) else 50368)


def test_valid_minimal_config_and_defaults():
    cfg = check_train_config(minimal())
    assert cfg.optimizer.name == "decoupled_adamw" and cfg.optimizer.kwargs == {} and cfg.precision == "amp_bf16"
    assert cfg.autoresume_enabled() is False
    cfg = check_train_config(minimal(run_name="r", save_folder="/tmp/x"))
    assert cfg.autoresume_enabled() is True
    cfg = check_train_config(minimal(run_name="r", save_folder="/tmp/x", autoresume=False))
    assert cfg.autoresume_enabled() is False


def test_all_problems_of_all_sections_reported_together():
    cfg = minimal(
        max_durration="4ba",                                              # misspelt top-level key
        max_duration="4 batches",                                         # bad duration string
        global_train_batch_size=5,                                        # not divisible by 2 ranks
        optimizer={"name": "decoupled_adamw", "lrr": 1e-3},               # bad optimizer kwarg
        scheduler={"name": "cosine_warmup", "t_warmup": "1ba"},           # unknown scheduler
        callbacks={"speed_monitr": {}, "lr_monitor": {"foo": 1}},         # unknown callback, bad kwarg
        loggers={"wandb": {"projcet": "x"}},
        algorithms={"gradient_clipping": {"clipping_type": "norm"}},      # missing required kwarg
        precision="bf16",
        autoresume=True,                                                  # without run_name/save_folder
        fsdp_config={"sharding_strategy": "FULL_SHARDING"},
    )
    cfg["model"]["n_layer"] = 2                                           # misspelt model key
    problems, text = problems_of(cfg, world_size=2)
    expected = [
        "max_durration: unknown key (did you mean 'max_duration'?)",
        "max_duration: '4 batches' is not a duration",
        "global_train_batch_size: 5 is not divisible by the world size 2",
        "optimizer.lrr: unknown key (did you mean 'lr'?)",
        "scheduler.name: unknown scheduler 'cosine_warmup' (did you mean 'cosine_with_warmup'?)",
        "callbacks.speed_monitr: unknown callback 'speed_monitr' (did you mean 'speed_monitor'?)",
        "callbacks.lr_monitor.foo: unknown key",
        "loggers.wandb.projcet: unknown key (did you mean 'project'?)",
        "algorithms.gradient_clipping.clipping_threshold: missing required key",
        "precision: 'bf16' is not allowed",
        "autoresume: needs run_name and save_folder",
        "fsdp_config.sharding_strategy: 'FULL_SHARDING' is not allowed",
        "model.n_layer: unknown key (did you mean 'n_layers'?)",
    ]
    for piece in expected:
        assert piece in text, f"missing {piece!r} in:\n{text}"


def test_missing_required_and_wrong_types():
    cfg = minimal(global_train_batch_size="four", eval_first="yes")
    del cfg["tokenizer"]
    problems, text = problems_of(cfg)
    assert "tokenizer: missing required key" in text
    assert "global_train_batch_size: expected int" in text
    assert "eval_first: expected bool" in text


def test_unknown_model_name_and_microbatch_divisibility():
    cfg = minimal(global_train_batch_size=8, device_train_microbatch_size=3)
    cfg["model"]["name"] = "mpt_causal"
    _, text = problems_of(cfg, world_size=2)
    assert "model.name: unknown model 'mpt_causal' (did you mean 'mpt_causal_lm'?)" in text
    assert "device_train_microbatch_size: 3 does not divide the per-device batch 4" in text


def test_eval_loader_list_needs_labels():
    loader = minimal()["train_loader"]
    _, text = problems_of(minimal(eval_loader=[dict(loader), dict(loader)]))
    assert "distinct `label`" in text


def test_cli_prints_config_errors_without_traceback_exit_2(tmp_path, capsys):
    from llmfoundry_lite.cli import main
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_duration: 10ba\nmax_seq_len: 16\nglobal_train_batch_size: 4\n")
    assert main(["train", str(bad), "optimizer.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "model: missing required key" in err and "train_loader: missing required key" in err
    assert "Traceback" not in err


# --- builders -----------------------------------------------------------------------------------

def test_inv_sqrt_schedule_values():
    from composer.core import State, Time

    from llmfoundry_lite.training.builders import InverseSquareRootWithWarmupScheduler
    model = torch.nn.Linear(1, 1)
    state = State(model=model, rank_zero_seed=0, run_name="x", device="cpu", max_duration="100ba")
    sched = InverseSquareRootWithWarmupScheduler(t_warmup="10ba", t_scale="10ba", t_cooldown="20ba",
                                                 alpha_f_cooldown=0.0)

    def at(batch):
        state.timestamp = state.timestamp.copy(batch=Time(batch, "ba"))
        return sched(state)

    assert at(5) == pytest.approx(0.5)
    assert at(10) == pytest.approx(1.0)
    assert at(50) == pytest.approx(1 / math.sqrt(1 + 40 / 10))
    start = 1 / math.sqrt(1 + 70 / 10)
    assert at(90) == pytest.approx(start * 0.5)  # halfway through the cooldown to 0
    assert at(100) == pytest.approx(0.0)


def test_lion_step_matches_hand_computation():
    from llmfoundry_lite.training.builders import DecoupledLionW
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = DecoupledLionW([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.01)
    for group in opt.param_groups:
        group["initial_lr"] = 0.1
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    opt.step()
    # m=0: update = sign(0.1 * g); decay 1 - 0.01 * (lr/initial_lr)
    expected = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.01) - 0.1 * torch.tensor([1.0, -1.0, 0.0])
    assert torch.allclose(p.detach(), expected)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.01 * torch.tensor([0.3, -0.1, 0.0]))


def test_precision_and_fsdp_mapping():
    from llmfoundry_lite.training.entry import fsdp2_config, resolve_precision
    from llmfoundry_lite.training.schema import FSDPSection
    with pytest.warns(UserWarning, match="fp32 on CPU"):
        assert resolve_precision("amp_bf16", on_gpu=False) == "fp32"
    assert resolve_precision("amp_bf16", on_gpu=True) == "amp_bf16"
    assert fsdp2_config(FSDPSection(sharding_strategy="NO_SHARD"), 2) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # one process runs FSDP2 too (a world of one: its checkpoints resume on any world size); HYBRID_SHARD
        # there is a one-dimensional mesh
        single = fsdp2_config(FSDPSection(sharding_strategy="HYBRID_SHARD", data_parallel_shard_degree=8), 1)
        assert single.data_parallel_shard_degree == -1 and single.data_parallel_replicate_degree is None
        zero2 = fsdp2_config(FSDPSection(sharding_strategy="SHARD_GRAD_OP", state_dict_type="full",
                                         activation_checkpointing=True), 2)
        zero3 = fsdp2_config(FSDPSection(), 2)
    assert zero2.reshard_after_forward is False and zero3.reshard_after_forward is True
    assert zero2.state_dict_type == "full" and zero2.activation_checkpointing is True


def test_hybrid_shard_on_cpu_needs_a_torch_whose_fsdp2_runs_it_there():
    """torch 2.7's FSDP2 cannot run HYBRID_SHARD over gloo; a newer one can (tests/test_parallel_layouts.py
    trains it in the compatibility run). HYBRID_SHARD's mesh degrees reach Composer either way."""
    from llmfoundry_lite.compat.torch import FSDP2_HSDP_ON_CPU
    from llmfoundry_lite.training.entry import fsdp2_config
    cfg = minimal(fsdp_config={"sharding_strategy": "HYBRID_SHARD", "data_parallel_replicate_degree": 2,
                               "data_parallel_shard_degree": 1})
    if FSDP2_HSDP_ON_CPU or torch.cuda.is_available():
        section = check_train_config(cfg, world_size=2).fsdp_config
    else:
        problems, _ = problems_of(cfg, world_size=2)
        assert any("HYBRID_SHARD cannot train on CPU" in p for p in problems)
        section = check_train_config(minimal(fsdp_config={**cfg["fsdp_config"], "sharding_strategy": "FULL_SHARD"}),
                                     world_size=2).fsdp_config
        section.sharding_strategy = "HYBRID_SHARD"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdp = fsdp2_config(section, 2)
    # Composer builds the mesh from these degrees (and ignores a device_mesh): (replicate, shard) = (2, 1)
    assert (fsdp.data_parallel_replicate_degree, fsdp.data_parallel_shard_degree) == (2, 1)
    assert fsdp2_config(check_train_config(minimal(fsdp_config={}), world_size=2).fsdp_config, 2) \
        .data_parallel_shard_degree == -1


def test_meta_build_materialises_tied_and_finite():
    from llmfoundry_lite.assembly.sharding import materialize_meta, on_meta
    from llmfoundry_lite.models import MPTConfig, MPTForCausalLM
    model = MPTForCausalLM(MPTConfig(d_model=32, n_heads=2, n_layers=2, vocab_size=64, max_seq_len=16,
                                     init_device="meta"))
    assert on_meta(model)
    materialize_meta(model)
    assert not on_meta(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norms = [m.weight for n, m in model.named_modules() if n.endswith("norm_1")]
    assert all(torch.equal(w, torch.ones_like(w)) for w in norms)
