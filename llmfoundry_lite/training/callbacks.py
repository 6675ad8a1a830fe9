"""Training callbacks and loggers of our own (Composer provides lr/memory monitors and the rest).

- `SpeedMonitor`: tokens/s and MFU against a declared peak-FLOPs table printed at fit start.
- `HFCheckpointer`: a Hugging Face folder every N batches and at the end (gathered under FSDP2).
- `LossSpikeGuard`: skips steps with a NaN/inf loss or gradient, logs spikes, stops a failing run.
- `JSONLLogger`: every logged metric as one JSON line, full float precision (for plots and tests).
- `WandBLogger`: Composer's, made to work with wandb >= 0.31.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from typing import Optional

import torch
from composer.core import Callback, Event, State, Time, TimeUnit
from composer.loggers import Logger, LoggerDestination
from composer.loggers import WandBLogger as ComposerWandBLogger
from composer.utils import dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llmfoundry_lite import stores
from llmfoundry_lite.assembly.lora import base_model, is_peft
from llmfoundry_lite.assembly.weights import model_from_weights
from llmfoundry_lite.compat.composer import give_wandb_runs_get_url
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.export.command import check_remote_export, export_target
from llmfoundry_lite.export.hf_export import check_export_target, write_hf_folder, write_lora_folder
from llmfoundry_lite.models import flops_per_token

log = logging.getLogger(__name__)

# Dense peak FLOP/s per device from the vendors' datasheets (no sparsity). `fp32` is the non-tensor-core
# rate. H200/H100 are assumed SXM. CPUs have no datasheet entry: see `device_peak_flops`.
PEAK_FLOPS = {
    "h200": {"amp_bf16": 989e12, "amp_fp16": 989e12, "fp32": 67e12},
    "h100": {"amp_bf16": 989e12, "amp_fp16": 989e12, "fp32": 67e12},
    "a100": {"amp_bf16": 312e12, "amp_fp16": 312e12, "fp32": 19.5e12},
    "l40s": {"amp_bf16": 362e12, "amp_fp16": 362e12, "fp32": 91.6e12},
    "a10": {"amp_bf16": 125e12, "amp_fp16": 125e12, "fp32": 31.2e12},
    "l4": {"amp_bf16": 121e12, "amp_fp16": 121e12, "fp32": 30.3e12},
    "v100": {"amp_fp16": 125e12, "fp32": 15.7e12},
    "t4": {"amp_fp16": 65e12, "fp32": 8.1e12},
}
CPU_FLOPS_PER_CYCLE = 32  # fp32, AVX2: 2 FMA units x 8 lanes x 2 FLOPs per FMA


def device_peak_flops(precision: str) -> tuple:
    """(device name, peak FLOP/s or None) for this process's device and precision; on CPU the fp32 peak
    of the cores this process uses: threads x clock x CPU_FLOPS_PER_CYCLE."""
    if not torch.cuda.is_available():
        mhz = 2500.0
        with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/cpuinfo") as f:
            mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
        return f"cpu x{torch.get_num_threads()} threads", torch.get_num_threads() * mhz * 1e6 * CPU_FLOPS_PER_CYCLE
    name = torch.cuda.get_device_name().lower()
    for key, rates in PEAK_FLOPS.items():  # ordered so 'a100' is tried before 'a10', 'l40s' before 'l4'
        if key in name:
            return name, rates.get(precision, rates["fp32"])
    return name, None


def unwrap(state: State):
    """The ComposerMPTCausalLM behind DDP (FSDP2 keeps the module itself)."""
    return getattr(state.model, "module", state.model)


class SpeedMonitor(Callback):
    """Logs throughput/tokens_per_sec, throughput/device/tokens_per_sec, throughput/device/mfu and
    throughput/device/hfu (hardware FLOPs: with activation checkpointing the blocks' forward twice).

    Tokens are all positions of `input_ids` (padding included, as Composer counts them); FLOPs per
    token come from `models.flops_per_token` (6 x matmul params + attention, forward and backward).
    `peak_flops` overrides the declared per-device peak (FLOP/s).
    """

    def __init__(self, window_size: int = 20, peak_flops: Optional[float] = None):
        self.window = deque(maxlen=window_size + 1)
        self.peak_override = peak_flops
        self.peak = None

    def fit_start(self, state: State, logger: Logger) -> None:
        name, declared = device_peak_flops(state.precision.value)
        self.peak = self.peak_override or declared
        if dist.get_global_rank() == 0:
            table = "\n".join(f"  {k:6s} " + "  ".join(f"{p}={v / 1e12:g}T" for p, v in r.items())
                              for k, r in PEAK_FLOPS.items())
            print(f"speed_monitor: declared peak FLOP/s per device (datasheet, dense):\n{table}\n"
                  f"  cpu    threads x clock x {CPU_FLOPS_PER_CYCLE} fp32 FLOPs/cycle\n"
                  f"speed_monitor: this run: {name}, precision {state.precision.value}, "
                  f"peak {self.peak / 1e12 if self.peak else float('nan'):.3g} TFLOP/s"
                  f"{' (from peak_flops)' if self.peak_override else ''}", flush=True)

    def batch_end(self, state: State, logger: Logger) -> None:
        self.window.append((time.perf_counter(), state.timestamp.token.value))
        if len(self.window) < 2:
            return
        (t0, n0), (t1, n1) = self.window[0], self.window[-1]
        tokens_per_sec = (n1 - n0) / max(t1 - t0, 1e-9)
        per_device = tokens_per_sec / dist.get_world_size()
        seq_len = state.batch["input_ids"].shape[1]
        config = unwrap(state).model.config
        flops = per_device * flops_per_token(config, seq_len)
        recompute = bool(getattr(state.fsdp_config, "activation_checkpointing", False))
        hardware_flops = per_device * flops_per_token(config, seq_len, recompute=recompute)
        metrics = {"throughput/tokens_per_sec": tokens_per_sec, "throughput/device/tokens_per_sec": per_device,
                   "throughput/device/flops_per_sec": flops}
        if self.peak:
            metrics["throughput/device/mfu"] = flops / self.peak
            metrics["throughput/device/hfu"] = hardware_flops / self.peak
        logger.log_metrics(metrics)


def full_state_dict(module: torch.nn.Module) -> dict:
    """The unsharded state dict on CPU (on rank 0 when distributed; every rank must call this)."""
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class HFCheckpointer(Callback):
    """Writes `save_folder/ba{batch}` as a Hugging Face folder every `save_interval` (batches, '500ba', or
    epochs, '1ep') and at fit end, with weights in `precision` (float32 | bfloat16 | float16). A LoRA
    run writes the model with its adapters merged, or with `adapter_only: true` peft's adapter folder
    (see export/hf_export.py write_lora_folder). A `ba{batch}` folder there that it did not write is
    refused before training unless `overwrite` (llm-foundry's key; its default is true, ours false: see
    hf_export.OVERWRITE_DOES). A `save_folder` in an object store (`s3://bucket/prefix`): rank 0 writes
    each folder into a local staging folder and uploads it, `config.json` last (export/command.py
    `export_target`); a `ba{batch}` prefix there that no export of ours wrote is refused the same way."""
    FLAGS = ("hf_checkpointer.save_folder", "hf_checkpointer.overwrite: true")  # named in refusals

    def __init__(self, save_folder: str, save_interval: str = "1ep", precision: str = "float32",
                 adapter_only: bool = False, overwrite: bool = False):
        self.save_folder = save_folder
        self.interval = Time.from_timestring(save_interval)
        if self.interval.unit not in (TimeUnit.BATCH, TimeUnit.EPOCH) or self.interval.value <= 0:
            raise UserError(f"hf_checkpointer.save_interval: use batches or epochs (e.g. '500ba', '1ep'), "
                            f"got {save_interval!r}")
        if precision not in ("float32", "bfloat16", "float16"):
            raise UserError(f"hf_checkpointer.precision: one of float32, bfloat16, float16; got {precision!r}")
        self.dtype = getattr(torch, precision)
        self.adapter_only, self.overwrite = adapter_only, overwrite
        self.last_saved = -1

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT and self.adapter_only and not is_peft(unwrap(state).model):
            raise UserError("hf_checkpointer.adapter_only: this run has no LoRA adapters (model.peft_config); "
                            "remove adapter_only")
        if event == Event.INIT and dist.get_global_rank() == 0 and stores.is_remote(self.save_folder):
            for name in sorted({n.split("/")[0] for n in stores.names(self.save_folder)}):
                if re.fullmatch(r"ba\d+", name):  # what a later save would replace
                    check_remote_export(stores.join(self.save_folder, name), self.overwrite, self.FLAGS)
        elif event == Event.INIT and dist.get_global_rank() == 0 and os.path.isdir(self.save_folder):
            for name in sorted(os.listdir(self.save_folder)):  # what a later save would replace
                if re.fullmatch(r"ba\d+", name):
                    check_export_target(os.path.join(self.save_folder, name), self.overwrite, self.FLAGS)
        unit = {Event.BATCH_END: TimeUnit.BATCH, Event.EPOCH_END: TimeUnit.EPOCH}.get(event)
        due = unit == self.interval.unit and state.timestamp.get(unit).value % self.interval.value == 0
        if due or event == Event.FIT_END:
            self.save(state)

    def save(self, state: State) -> None:
        batch = state.timestamp.batch.value
        if batch == self.last_saved:
            return
        self.last_saved = batch
        composer_model = unwrap(state)
        weights = full_state_dict(composer_model.model)
        if dist.get_global_rank() == 0:
            model = composer_model.model
            config = base_model(model).config.__class__.from_dict(base_model(model).config.to_dict())
            config.init_device = "cpu"  # the folder must load without FSDP
            flags = self.FLAGS
            target = (stores.join(self.save_folder, f"ba{batch}") if stores.is_remote(self.save_folder)
                      else os.path.join(self.save_folder, f"ba{batch}"))
            with export_target(target, self.overwrite, flags, weights=not self.adapter_only, log=log.info) as out:
                if is_peft(model):  # a CPU copy of the LoRA model from the gathered weights, exported as convert does
                    copy = model_from_weights(config, weights, "hf_checkpointer", model.peft_config[model.active_adapter])
                    write_lora_folder(copy, out, composer_model.tokenizer, self.dtype, self.adapter_only,
                                      overwrite=self.overwrite, flags=flags)
                else:
                    write_hf_folder(config, weights, out, tokenizer=composer_model.tokenizer, dtype=self.dtype,
                                    overwrite=self.overwrite, flags=flags)
            log.info("hf_checkpointer: wrote %s", target)
        dist.barrier()


class TrainingDiverged(UserError):
    """The loss became non-finite or kept spiking."""


class LossSpikeGuard(Callback):
    """Skips optimizer steps whose loss or gradients are not finite, logs loss spikes, stops a run
    that keeps failing.

    Non-finite: checked after the last backward pass, before the optimizer step, on every rank (one
    all-reduce: all ranks agree). The step's gradients are dropped, so weights and optimizer moments
    stay as they were. After `max_nonfinite_steps` such steps in a row the run stops: Composer saves
    these last good weights when `save_folder` is set, and `train()` raises `TrainingDiverged`.

    Spikes: a finite loss above `outlier_multiplier` x the mean of the last `window_size` normal losses
    (once `min_history` are seen), or above `loss_cap`, is logged; `patience` spikes in a row raise
    `TrainingDiverged` (resume from the last checkpoint with a lower learning rate).
    """

    def __init__(self, window_size: int = 100, outlier_multiplier: float = 2.0, patience: int = 4,
                 loss_cap: Optional[float] = None, min_history: int = 10, max_nonfinite_steps: int = 3):
        self.history = deque(maxlen=window_size)
        self.outlier_multiplier, self.patience, self.loss_cap = outlier_multiplier, patience, loss_cap
        self.min_history, self.max_nonfinite_steps = min_history, max_nonfinite_steps
        self.strikes = 0
        self.nonfinite = 0  # skipped steps in a row
        self.stopped: Optional[str] = None  # why the run was stopped, for `train()` to raise

    def after_train_batch(self, state: State, logger: Logger) -> None:
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        local = [getattr(g, "to_local", lambda g=g: g)() for g in grads]  # FSDP2: this rank's shards
        finite = torch.stack([torch.isfinite(g).all() for g in local]).all() if local else torch.tensor(True)
        losses = state.loss.values() if isinstance(state.loss, dict) else [state.loss]
        for v in losses:  # tensor ops only: the one host sync is the flag's, after the all-reduce
            finite = finite.to(v.device) & torch.isfinite(v.detach()).all()
        flag = state.device.tensor_to_device(finite.float().reshape(1))
        dist.all_reduce(flag, reduce_operation="MIN")
        batch = state.timestamp.batch.value + 1  # the batch being trained, counted from 1 as Composer logs it
        if flag.item() == 1.0:
            self.nonfinite = 0
            return
        for p in state.model.parameters():  # the optimizer skips parameters without a gradient
            p.grad = None
        self.nonfinite += 1
        logger.log_metrics({"nonfinite/skipped_steps": self.nonfinite})
        log.warning("non-finite loss or gradient at batch %d: step skipped, weights unchanged (%d/%d in a row)",
                    batch, self.nonfinite, self.max_nonfinite_steps)
        if self.nonfinite >= self.max_nonfinite_steps:
            self.stopped = (f"{self.nonfinite} steps in a row had a non-finite loss or gradient (batches "
                            f"{batch - self.nonfinite + 1}-{batch}); none was applied. Lower the learning rate, "
                            "add algorithms.gradient_clipping, or check the data")
            state.stop_training()  # the final checkpoint holds the last good weights

    def batch_end(self, state: State, logger: Logger) -> None:
        loss = state.total_loss_dict.get("loss/train/total")
        if loss is None or self.nonfinite or not math.isfinite(loss):
            return
        batch = state.timestamp.batch.value
        mean = sum(self.history) / len(self.history) if self.history else math.inf
        spiked = (self.loss_cap is not None and loss > self.loss_cap) or (
            len(self.history) >= self.min_history and loss > self.outlier_multiplier * mean)
        if not spiked:
            self.strikes = 0
            self.history.append(loss)
            return
        self.strikes += 1
        logger.log_metrics({"loss_spike/strikes": self.strikes})
        log.warning("loss spike at batch %d: %.4f vs running mean %.4f (%d/%d)", batch, loss, mean,
                    self.strikes, self.patience)
        if self.strikes >= self.patience:
            raise TrainingDiverged(f"loss spiked {self.strikes} batches in a row (last {loss:.4f}, running mean "
                                   f"{mean:.4f}) at batch {batch}: lower the learning rate or add gradient clipping, "
                                   "then resume from the last checkpoint")

    def state_dict(self):
        return {"history": list(self.history), "strikes": self.strikes, "nonfinite": self.nonfinite}

    def load_state_dict(self, state: dict) -> None:
        self.history.extend(state.get("history", []))
        self.strikes = state.get("strikes", 0)
        self.nonfinite = state.get("nonfinite", 0)


class JSONLLogger(LoggerDestination):
    """Appends `{"step": batch, metric: value, ...}` per logging call to `path` (rank 0 only)."""

    def __init__(self, path: str):
        self.path = path

    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        if dist.get_global_rank() != 0:
            return
        row = {"step": step, **{k: v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
                                for k, v in metrics.items()}}
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


class WandBLogger(ComposerWandBLogger):
    """Composer's W&B logger (`WANDB_MODE=offline` writes the run locally), on every wandb release
    (compat/composer.py)."""

    def init(self, state: State, logger: Logger) -> None:
        give_wandb_runs_get_url()
        super().init(state, logger)
