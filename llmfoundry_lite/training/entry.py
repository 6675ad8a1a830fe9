"""`train(cfg, overrides)`: one function behind `llmfoundry-lite train`, `composer scripts/train.py`
and notebooks.

Order matters: the whole config is checked first (one ConfigError listing every problem), then the
process group, tokenizer, model, data, optimizer and the Composer Trainer are built. Autoresume is
on by default when `run_name` and `save_folder` are set: relaunching the same command continues
from the latest checkpoint (weights, optimizer, scheduler, RNG and dataloader position).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from typing import Mapping, Optional, Sequence, Union

import torch
from composer import DataSpec, Trainer
from composer.callbacks import CheckpointSaver
from composer.core import Evaluator
from composer.utils import dist, reproducibility
from torch.distributed.checkpoint.api import CheckpointException

from llmfoundry_lite import registry, stores
from llmfoundry_lite.assembly.lora import is_peft, param_counts
from llmfoundry_lite.assembly.sharding import materialize_meta, on_meta, prepare_model
from llmfoundry_lite.compat.composer import MeshFSDP2Config, meta_init_by
from llmfoundry_lite.compat.torch import average_gradients_on_gloo
from llmfoundry_lite.config import load_config
from llmfoundry_lite.config.parallel import FSDPSection, hybrid_degrees
from llmfoundry_lite.config.schema import flat_values
from llmfoundry_lite.data.loaders import build_dataloader, labelled_loaders
from llmfoundry_lite.errors import ConfigError, DataError, UserError
from llmfoundry_lite.export import checksums
from llmfoundry_lite.export.composer_checkpoint import POINTER, check_resumable, resolve
from llmfoundry_lite.export.safe_load import refusal_inside
from llmfoundry_lite.opening import local_copy, open_model
from llmfoundry_lite.training.callbacks import LossSpikeGuard, TrainingDiverged
from llmfoundry_lite.training.checkpoints import (
    LATEST,
    ChecksumManifests,
    check_save_folder,
    checkpoint_write_error,
    corruption,
    gate_composer_loading,
    prepare_autoresume,
)
from llmfoundry_lite.training.heartbeat import Heartbeat
from llmfoundry_lite.training.icl_evaluators import add_icl_metrics, build_icl_evaluators
from llmfoundry_lite.training.launch import start_process_group
from llmfoundry_lite.training.preemption import Preempted, PreemptionSave
from llmfoundry_lite.training.preflight import preflight
from llmfoundry_lite.training.schema import TrainConfig, check_train_config, save_uri
from llmfoundry_lite.training.store_checkpoints import UploadCheckpoints, candidates, claim_prefix, fetch, fresh_staging

log = logging.getLogger(__name__)


def train(cfg: Union[str, os.PathLike, Mapping], overrides: Sequence[str] = ()):
    """Train from a YAML path or dict with `key.sub=value` overrides; returns the fitted Composer Trainer."""
    return fit(check_train_config(load_config(cfg, overrides), world_size=dist.get_world_size()))


def _setup_logging(level: str) -> None:
    if level is None:
        return
    logging.basicConfig(format=f"%(asctime)s: rank{dist.get_global_rank()}[%(process)d]: %(levelname)s: "
                               f"%(name)s: %(message)s")
    logging.getLogger("llmfoundry_lite").setLevel(level.upper())


def _microbatch(tc: TrainConfig, device_batch: int, auto_ok: bool):
    mb = tc.device_train_microbatch_size
    if mb == "auto" and not auto_ok:
        # Composer searches microbatch sizes only on GPU and not under FSDP2.
        warnings.warn("device_train_microbatch_size 'auto' needs a GPU without FSDP2 (fsdp_config: null on one GPU); "
                      "using the whole device batch "
                      f"({device_batch}); set an int to save memory", stacklevel=2)
        mb = None
    return device_batch if mb is None else mb  # one larger than the device batch: one microbatch (Composer)


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """Composer allows only fp32 on CPU: amp_* falls back to fp32 there, so GPU YAMLs still run."""
    if not on_gpu and precision != "fp32":
        warnings.warn(f"precision {precision} needs a GPU; training in fp32 on CPU", stacklevel=2)
        return "fp32"
    return precision


def fsdp2_config(section: Optional[FSDPSection], world_size: int):
    """The `FSDP2Config` for llm-foundry's `fsdp_config`, or None for no FSDP (none given, or NO_SHARD:
    Composer's DDP). Composer shards each MPT block and the model:

      FULL_SHARD     -> reshard_after_forward=True (ZeRO-3)
      SHARD_GRAD_OP  -> reshard_after_forward=False (ZeRO-2: params stay gathered between fwd and bwd)
      HYBRID_SHARD   -> a 2-D mesh (replicate, shard): shard inside groups, replicate across them

    One process runs FSDP2 too, over a world of one: its checkpoints then have the format
    `state_dict_type` names, so a run saved by N processes resumes on M (DCP reshards on load).
    """
    if section is None:
        return None
    if section.sharding_strategy == "NO_SHARD":
        log.info("fsdp_config.sharding_strategy NO_SHARD: using DDP")
        return None
    rep, shard = None, -1  # one shard group of all ranks
    if section.sharding_strategy == "HYBRID_SHARD" and world_size > 1:
        if section.data_parallel_shard_degree in (-1, None) and section.data_parallel_replicate_degree is None:
            # llm-foundry's default: shard within a node, replicate across nodes
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
            section = dataclasses.replace(section, data_parallel_shard_degree=local)
        rep, shard = hybrid_degrees(section, world_size)

    with warnings.catch_warnings():  # "FSDP2 Config/APIs are experimental": we chose them knowingly
        warnings.simplefilter("ignore", UserWarning)
        return MeshFSDP2Config(
            data_parallel_replicate_degree=rep, data_parallel_shard_degree=shard,
            reshard_after_forward=section.sharding_strategy != "SHARD_GRAD_OP",
            activation_checkpointing=section.activation_checkpointing,
            activation_cpu_offload=section.activation_cpu_offload,
            state_dict_type=section.state_dict_type,
            mixed_precision=section.mixed_precision,
            verbose=section.verbose,
        )


# TrainConfig keys that are Composer Trainer arguments of the same name and meaning.
TRAINER_KEYS = ("max_duration", "eval_interval", "eval_subset_num_batches", "seed", "run_name", "save_folder",
                "save_filename", "save_interval", "save_num_checkpoints_to_keep", "save_overwrite",
                "save_weights_only", "load_path", "load_weights_only", "load_strict_model_weights",
                "progress_bar", "log_to_console", "console_log_interval", "python_log_level", "dist_timeout")


def fit(tc: TrainConfig):
    """Build everything for a checked TrainConfig and run `Trainer.fit()`."""
    _setup_logging(tc.python_log_level)
    preflight(tc)
    on_gpu = torch.cuda.is_available()
    world_size = dist.get_world_size()
    if world_size > 1 or tc.fsdp_config:  # loaders and device meshes need the process group before the Trainer
        start_process_group(on_gpu, tc.dist_timeout)
    tc = _local_copies(tc)
    reproducibility.seed_all(tc.seed)  # the same initial weights on every rank
    tokenizer = tc.tokenizer.build()
    objective = registry.objectives.get(tc.loss_fn())
    device_batch = tc.global_train_batch_size // world_size
    inner = open_model(tc.model, tokenizer)[0]
    problems = [p for rule in objective.model_rules for p in rule(tc, inner)]
    if problems:
        raise ConfigError(problems, "invalid training config")
    train_dataloader = build_dataloader(tc.train_loader, tokenizer, device_batch)
    model = objective.build(inner, tokenizer, tc.objective_options(objective)[0], train_dataloader)
    fsdp = fsdp2_config(tc.fsdp_config, world_size)
    prepare_model(model, tc.compile_config, bool(tc.fsdp_config and tc.fsdp_config.activation_checkpointing),
                  sharded=fsdp is not None, seed=tc.seed)
    evaluators = _evaluators(tc, objective, model, tokenizer, tc.device_eval_batch_size or device_batch)
    save_folder, resume_from, bucket = _prepare_save_folder(tc, model)
    _log_parameters(model)
    # only what trains (all of it, or LoRA's adapters): frozen weights get no optimizer state
    optimizer = tc.optimizer.build([p for p in model.parameters() if p.requires_grad])
    _check_what_loads(tc, model, optimizer, bucket or save_folder, resume_from)
    meta_under_fsdp = fsdp is not None and on_meta(model)
    heartbeat = Heartbeat(tc.heartbeat_timeout or None)
    gate_composer_loading()
    with meta_init_by(materialize_meta, "cuda" if on_gpu else "cpu") if meta_under_fsdp else contextlib.nullcontext(), \
            _refusals_unwrapped():
        trainer = Trainer(
            model=model,
            train_dataloader=DataSpec(train_dataloader, get_num_samples_in_batch=objective.samples_in_batch),
            eval_dataloader=evaluators or None, optimizers=optimizer,
            schedulers=tc.scheduler.build() if tc.scheduler else None,
            algorithms=[s.build() for s in tc.algorithms.values()],
            callbacks=[*(s.build() for s in tc.callbacks.values()), *objective.callbacks(), heartbeat],
            loggers=[s.build() for s in tc.loggers.values()],
            device="gpu" if on_gpu else "cpu", precision=resolve_precision(tc.precision, on_gpu),
            device_train_microbatch_size=_microbatch(tc, device_batch, auto_ok=on_gpu and fsdp is None),
            parallelism_config={"fsdp": fsdp} if fsdp is not None else None, autoresume=tc.autoresume_enabled(),
            load_ignore_keys=_load_ignore_keys(tc, model),
            **_trainer_keys(tc, save_folder, bucket))
    trainer.logger.log_hyperparameters(flat_values(tc))  # the run's config, as llm-foundry logs it
    if fsdp is not None:
        average_gradients_on_gloo(trainer.state.model)
    layout = {"world_size": world_size, "global_train_batch_size": tc.global_train_batch_size}
    _add_after_saver(trainer, lambda saver: ChecksumManifests(saver, layout))
    preemption = _add_before_saver(trainer, PreemptionSave(tc.preemption_grace_period)) \
        if tc.preemption_grace_period and save_folder else None
    if bucket:  # after the manifests: they are uploaded with the checkpoint
        _add_after_saver(trainer, lambda saver: UploadCheckpoints(saver, bucket, tc.save_num_checkpoints_to_keep))
    _log_resume(tc, trainer, save_folder, bucket)
    if tc.load_path or trainer.state.timestamp.batch.value:  # not from the model section's weights
        objective.not_at_start(model)
    if tc.eval_first and evaluators and trainer.state.timestamp.batch.value == 0:
        trainer.eval()
    try:
        trainer.fit()
    except (OSError, RuntimeError, CheckpointException) as e:
        full = checkpoint_write_error(e, bucket or save_folder)
        if full is not None:
            raise full from None
        if not isinstance(e, RuntimeError):
            raise
        # gloo/NCCL: a peer process (another rank or node) went away mid-collective
        if isinstance(e, torch.distributed.DistError) or any(s in str(e) for s in _LOST_PEER):
            where = (f"autoresume continues from the last complete checkpoint in {bucket or save_folder}"
                     if tc.autoresume_enabled() else "set run_name and save_folder to be able to resume such a run")
            raise PeerLost(f"another rank or node stopped during training ({str(e).splitlines()[0][:300]}). Check "
                           f"its log, then relaunch every node with the same command: {where}") from None
        raise
    finally:
        heartbeat.stop()
        if preemption is not None:
            preemption.release()
    _raise_if_stopped(trainer, bucket or save_folder)
    if preemption is not None and preemption.stopped_at is not None:
        raise Preempted(f"stopped by SIGTERM after batch {preemption.stopped_at}, with a checkpoint of it in "
                        f"{bucket or save_folder}; relaunch the same command to resume from it")
    return trainer


def _trainer_keys(tc: TrainConfig, save_folder, bucket) -> dict:
    keys = {k: getattr(tc, k) for k in TRAINER_KEYS}
    if bucket:  # Composer saves into the staging folder; UploadCheckpoints uploads and rotates both
        keys.update(save_folder=save_folder, save_num_checkpoints_to_keep=-1)
    return keys


def _log_parameters(model) -> None:
    counts = param_counts(model)
    if dist.get_global_rank() == 0:
        log.info("trainable parameters: %s of %s (%.2f%%)", f"{counts['trainable']:,}", f"{counts['total']:,}",
                 100 * counts["trainable"] / max(counts["total"], 1))


def _load_ignore_keys(tc: TrainConfig, model):
    """`load_ignore_keys`, plus a tied output head: it is the embedding (filled in from it when loaded),
    and llm-foundry's checkpoints have no such key."""
    if not (tc.load_path and model.model.config.tie_word_embeddings):
        return tc.load_ignore_keys
    head = "base_model.model.lm_head.weight" if is_peft(model.model) else "lm_head.weight"  # LoRA: peft's names
    return [*(tc.load_ignore_keys or []), f"state/model/model.{head}"]


def _evaluators(tc: TrainConfig, objective, model, tokenizer, eval_batch: int) -> list:
    """Perplexity loaders, then ICL tasks (after the loaders took their metric names)."""
    evaluators = [Evaluator(label=label, dataloader=build_dataloader(section, tokenizer, eval_batch),
                            metric_names=list(model.val_metrics))
                  for label, section in labelled_loaders(tc.eval_loader)]
    for e in evaluators:
        problem = objective.eval_problem(model, e.dataloader.dataloader.dataset)
        if problem:
            raise DataError(f"eval_loader {e.label}: {problem}")
    if tc.icl_tasks is not None:
        add_icl_metrics(model)
        evaluators += build_icl_evaluators(tc.icl_tasks, tokenizer, eval_batch, tc.icl_seq_len or tc.max_seq_len)
    return evaluators


def _log_resume(tc: TrainConfig, trainer, save_folder, bucket) -> None:
    if tc.autoresume_enabled():
        resumed_at = trainer.state.timestamp.batch.value
        where, link = bucket or save_folder, os.path.join(save_folder, LATEST)
        target = stores.join(bucket, os.path.basename(os.path.realpath(link))) if bucket else os.path.realpath(link)
        log.info("autoresume: %s", f"resumed from {stores.join(where, POINTER if bucket else LATEST)} -> {target} "
                 f"at batch {resumed_at}" if resumed_at else f"no complete checkpoint in {where}; starting from scratch")
        before = checksums.layout(os.path.realpath(link)).get("world_size") if resumed_at else None
        if before and before != dist.get_world_size():
            log.info("autoresume: the checkpoint was written by %d processes; %d go on with the same global batch of "
                     "%d (%d each)", before, dist.get_world_size(), tc.global_train_batch_size,
                     tc.global_train_batch_size // dist.get_world_size())


# What gloo says when the other end of a collective died.
_LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


class PeerLost(UserError):
    """A rank or node of a multi-process run died; this one cannot go on alone."""


def _local_copies(tc: TrainConfig) -> TrainConfig:
    """`tc` with its object-store `load_path`, model folder and tokenizer downloaded (once per node, into
    the cache) and named by their local copies, which are then checked and loaded like local ones."""
    folder = tc.model.kwargs.get("pretrained_model_name_or_path")
    if stores.is_remote(folder):
        local = _on_local_rank0(lambda: local_copy(folder, "model.pretrained_model_name_or_path"))
        tc = dataclasses.replace(tc, model=dataclasses.replace(
            tc.model, kwargs={**tc.model.kwargs, "pretrained_model_name_or_path": local}))
    if stores.is_remote(tc.tokenizer.name):
        local = _on_local_rank0(lambda: local_copy(tc.tokenizer.name, "tokenizer.name"))
        tc = dataclasses.replace(tc, tokenizer=dataclasses.replace(tc.tokenizer, name=local))
    if stores.is_remote(tc.load_path):
        tc = dataclasses.replace(tc, load_path=_on_local_rank0(lambda: local_copy(tc.load_path, "load_path")))
    return tc


def _on_local_rank0(work):
    """`work()` on local rank 0 of each node (e.g. a download into a folder the node's ranks share);
    every rank gets its result."""
    result = [work() if dist.get_local_rank() == 0 else None]
    dist.broadcast_object_list(result, src=0)  # the same path on every node: cache folders are named by URI
    dist.barrier()
    return result[0]


def _prepare_save_folder(tc: TrainConfig, model):
    """Check that save_folder can take a checkpoint (global rank 0) and (autoresume) choose the checkpoint
    to resume from (every rank). Returns (the local folder Composer saves into, the checkpoint or None,
    the object-store URI the checkpoints are uploaded to or None)."""
    if not tc.save_folder:
        return None, None, None
    folder = save_uri(tc)
    bucket = folder if stores.is_remote(folder) else None
    if bucket:
        if dist.get_global_rank() == 0:
            claim_prefix(bucket, tc.save_overwrite)
        folder = fresh_staging(bucket)
    if "{" in folder:
        return folder, None, bucket
    if dist.get_global_rank() == 0:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        check_save_folder(folder, weights if tc.save_weights_only else weights + 2 * trained)  # + 2 Adam moments
    dist.barrier()
    if not tc.autoresume_enabled():
        return folder, None, bucket
    if bucket:
        return folder, prepare_autoresume(folder, lambda: candidates(bucket), lambda n: fetch(bucket, n, folder)), bucket
    return folder, prepare_autoresume(folder), None


def _check_what_loads(tc: TrainConfig, model, optimizer, save_folder, resume_from) -> None:
    """Before Composer loads a local checkpoint: it is intact (checksums, all ranks sharing the work) and
    holds this model's weights and optimizer, so that another model's checkpoint is named, not a traceback."""
    if resume_from is not None:
        check_resumable(resume_from, model.model, optimizer, weights_only=False,
                        fix=f"it is in save_folder {save_folder}, which a run of another model wrote: choose another "
                            "save_folder or run_name, or set the model keys to those of that run")
    elif tc.load_path and os.path.exists(tc.load_path):
        problems = corruption(resolve(tc.load_path))
        if problems:
            raise checksums.corrupt(f"load_path {tc.load_path}", problems)
        check_resumable(tc.load_path, model.model, optimizer, tc.load_weights_only)


@contextlib.contextmanager
def _refusals_unwrapped():
    """A checkpoint refused while Composer loads a sharded one reaches us wrapped in DCP's
    CheckpointException (a BaseException): raise our CheckpointError itself."""
    try:
        yield
    except CheckpointException as e:
        refused = refusal_inside(e)
        if refused is None:
            raise
        raise refused from None


def _add_after_saver(trainer, callback) -> None:
    """Append `callback(saver)` to run after Composer's CheckpointSaver on the same events."""
    saver = next((cb for cb in trainer.state.callbacks if isinstance(cb, CheckpointSaver)), None)
    if saver is not None:
        trainer.state.callbacks.append(callback(saver))


def _add_before_saver(trainer, callback):
    """Insert `callback` to run right before Composer's CheckpointSaver on the same events; None without a saver."""
    callbacks = trainer.state.callbacks
    at = next((i for i, cb in enumerate(callbacks) if isinstance(cb, CheckpointSaver)), None)
    if at is None:
        return None
    callbacks.insert(at, callback)
    return callback


def _raise_if_stopped(trainer, save_folder) -> None:
    """`LossSpikeGuard` stopped the run after non-finite steps: say so, and where the last good state is."""
    for cb in trainer.state.callbacks:
        if isinstance(cb, LossSpikeGuard) and cb.stopped:
            batch = trainer.state.timestamp.batch.value
            where = (f"a checkpoint of the last good weights is in {save_folder} (batch {batch}); relaunch the same "
                     "command after the fix to resume from it" if save_folder else
                     "no save_folder is set, so nothing was saved")
            raise TrainingDiverged(f"training stopped: {cb.stopped}. {where}")
