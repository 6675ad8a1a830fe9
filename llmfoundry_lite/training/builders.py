"""The built-in entries of the training registries, by the names llm-foundry YAMLs use.

Optimizers (`decoupled_adamw`, `decoupled_lionw`, `adamw`), schedulers (`cosine_with_warmup`,
`linear_decay_with_warmup`, `constant_with_warmup`, `inv_sqrt_with_warmup`), the algorithm
`gradient_clipping`, callbacks and loggers (`mlflow` needs the `mlflow` extra). A section's keys
are the keyword arguments of the registered class, so the config check validates them from its
signature and a plug-in registers its own classes the same way; `Section.build(...)` makes the instance.
"""
from __future__ import annotations

import inspect
import math
import warnings

import torch
from composer.algorithms import GradientClipping
from composer.callbacks import LRMonitor, MemoryMonitor, RuntimeEstimator
from composer.core import State
from composer.loggers import ConsoleLogger, Logger, ProgressBarLogger
from composer.loggers import MLFlowLogger as ComposerMLFlowLogger
from composer.optim import (
    ComposerScheduler,
    ConstantWithWarmupScheduler,
    CosineAnnealingWithWarmupScheduler,
    DecoupledAdamW,
    LinearWithWarmupScheduler,
)

from llmfoundry_lite import registry
from llmfoundry_lite.compat.composer import convert_time
from llmfoundry_lite.errors import UserError
from llmfoundry_lite.training.callbacks import HFCheckpointer, JSONLLogger, LossSpikeGuard, SpeedMonitor, WandBLogger


class DecoupledLionW(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms") with decoupled weight decay.

    update = sign(beta1 * m + (1 - beta1) * g); p -= lr * update; m = beta2 * m + (1 - beta2) * g.
    Weight decay shrinks p by `weight_decay * lr / initial_lr`, i.e. it follows the schedule but not
    the size of lr (as in Composer's DecoupledAdamW), so `weight_decay` is a per-step fraction.
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if lr <= 0 or not all(0.0 <= b < 1.0 for b in betas) or weight_decay < 0:
            raise ValueError(f"invalid DecoupledLionW arguments lr={lr}, betas={betas}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            schedule = lr / group["initial_lr"] if group.get("initial_lr") else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                if wd:
                    p.mul_(1 - wd * schedule)
                p.add_(exp_avg.lerp(p.grad, 1 - beta1).sign_(), alpha=-lr)
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


class InverseSquareRootWithWarmupScheduler(ComposerScheduler):
    """Linear warmup, then lr multiplier 1/sqrt(1 + (t - t_warmup) / t_scale), then a linear cooldown.

    The decay part is rescaled to end at `alpha_f_decay` when t_scale -> 0; the last `t_cooldown` of
    `t_max` goes linearly from wherever the decay is to `alpha_f_cooldown` (the "WSD"-style anneal).
    All times use Composer time strings and must share a unit once converted (batches or tokens).
    """

    def __init__(self, t_warmup, t_scale, t_cooldown="0ba", t_max="1dur", alpha_f_decay: float = 0.0,
                 alpha_f_cooldown: float = 0.0):
        self.t_warmup, self.t_scale, self.t_cooldown, self.t_max = t_warmup, t_scale, t_cooldown, t_max
        self.alpha_f_decay, self.alpha_f_cooldown = alpha_f_decay, alpha_f_cooldown

    def _decay(self, t: float, warmup: float, scale: float) -> float:
        inv = 1.0 / math.sqrt(1.0 + max(t - warmup, 0.0) / scale)
        return self.alpha_f_decay + (1.0 - self.alpha_f_decay) * inv

    def __call__(self, state: State, ssr: float = 1.0) -> float:
        times = [convert_time(x, state, ssr) for x in (self.t_warmup, self.t_scale, self.t_cooldown, self.t_max)]
        units = {x.unit for x in times if x.value}
        if len(units) > 1:
            raise ValueError(f"inv_sqrt_with_warmup: t_warmup, t_scale, t_cooldown and t_max must share a unit, "
                             f"got {[str(x) for x in times]}")
        warmup, scale, cooldown, t_max = (float(x.value) for x in times)
        t = float(state.timestamp.get(times[3].unit).value)
        if t < warmup:
            return t / warmup
        start = t_max - cooldown
        if cooldown <= 0 or t < start:
            return self._decay(t, warmup, max(scale, 1.0))
        at_start = self._decay(start, warmup, max(scale, 1.0))
        return at_start + (self.alpha_f_cooldown - at_start) * min((t - start) / cooldown, 1.0)


class MLFlowLogger(ComposerMLFlowLogger):
    """Composer's MLflow logger (`loggers: {mlflow: {tracking_uri, experiment_name, run_name, ...}}`, any
    argument of Composer's), with `resume` on by default: a run logs into the MLflow run of the experiment
    tagged with its Composer run_name when there is one, so an autoresumed run continues its MLflow run.
    It registers no models (Composer's logger does only when a callback asks it to; none here does).
    A hyperparameter the MLflow run already has keeps its value (warning): MLflow refuses to change one,
    and logging asynchronously (the default) it then drops the whole buffered batch, metrics included."""

    def __init__(self, *args, resume: bool = True, **kwargs):
        try:
            import mlflow  # noqa: F401  # lazy: the optional `mlflow` extra (Composer imports it here too)
        except ImportError as e:
            raise UserError("loggers.mlflow needs the mlflow package: pip install 'llmfoundry-lite[mlflow]'") from e
        super().__init__(*args, resume=resume, **kwargs)
        self._post_closed, self._params = False, {}

    def init(self, state: State, logger: Logger) -> None:
        super().init(state, logger)
        if self._enabled:  # a resumed run's params (Composer's node_name, num_gpus_per_node can differ now)
            self._params = dict(self._mlflow_client.get_run(self._run_id).data.params)

    def log_hyperparameters(self, hyperparameters: dict) -> None:
        new = {k: v for k, v in hyperparameters.items() if self._params.get(k, str(v)) == str(v)}
        if len(new) < len(hyperparameters):
            warnings.warn(f"MLflow run {self._run_id} keeps its logged values of "
                          f"{sorted(set(hyperparameters) - set(new))} (MLflow never changes a param)", stacklevel=2)
        self._params.update((k, str(v)) for k, v in new.items())
        super().log_hyperparameters(new)

    def post_close(self):
        # Composer's engine runs post_close again at exit (atexit) for every Trainer not yet garbage collected:
        # the second time would ask the tracking server for the run's status again (minutes of retries if it is gone).
        if not self._post_closed:
            self._post_closed = True
            super().post_close()


# The config check reads a logger's keys from its signature: Composer's, with resume=True.
_composer_signature = inspect.signature(ComposerMLFlowLogger.__init__)
MLFlowLogger.__init__.__signature__ = _composer_signature.replace(parameters=[
    p.replace(default=True) if p.name == "resume" else p for p in _composer_signature.parameters.values()])


for reg, entries in (
    (registry.optimizers, {"decoupled_adamw": DecoupledAdamW, "decoupled_lionw": DecoupledLionW,
                           "adamw": torch.optim.AdamW}),
    (registry.schedulers, {"cosine_with_warmup": CosineAnnealingWithWarmupScheduler,
                           "linear_decay_with_warmup": LinearWithWarmupScheduler,
                           "constant_with_warmup": ConstantWithWarmupScheduler,
                           "inv_sqrt_with_warmup": InverseSquareRootWithWarmupScheduler}),
    (registry.algorithms, {"gradient_clipping": GradientClipping}),
    (registry.callbacks, {"speed_monitor": SpeedMonitor, "lr_monitor": LRMonitor, "memory_monitor": MemoryMonitor,
                          "runtime_estimator": RuntimeEstimator, "hf_checkpointer": HFCheckpointer,
                          "loss_spike_guard": LossSpikeGuard}),
    (registry.loggers, {"wandb": WandBLogger, "console": ConsoleLogger, "progress_bar": ProgressBarLogger,
                        "jsonl": JSONLLogger, "mlflow": MLFlowLogger}),
):
    for name, obj in entries.items():
        reg.register(name, obj)
