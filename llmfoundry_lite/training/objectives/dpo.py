"""`loss_fn: dpo`: Direct Preference Optimization as a loss of the Composer model (no separate trainer).

Batches are preference pairs, `[B, 2, L]` (data/collators.py `PreferenceCollator`: side 0 chosen, side
1 rejected, labels on the reply only), or packed (`PreferencePackingCollator`, `packing_ratio`): rows
`[R, L]` of several pairs, both sides of a pair in one row as sequences 2j (chosen) and 2j+1 (rejected)
of `sequence_id`, and `pair_mask` `[R, P]`. A packed batch needs a model that attends by sequence_id
(`attn_config.attn_uses_sequence_id`, checked with the config) so that no sequence sees another.
A sequence's log-probability is the sum over its reply tokens (a packed row's per-token log-probs
summed per sequence_id). Composer weights a microbatch's loss (its mean over its pairs) by its share
of the step's pairs (`pairs_in_batch`), so a step's loss is the mean over all its pairs, packed or not.
With the policy's (pi) and the reference model's (ref) log-probabilities of chosen (c) and rejected (r),
h = (pi_c - pi_r) - (ref_c - ref_r), and `model.dpo`'s beta and label_smoothing (eps):

    sigmoid (DPO, Rafailov et al. 2023; eps > 0: conservative DPO)
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)
    ipo (Azar et al. 2023)
        loss = (h - 1 / (2 * beta)) ** 2

averaged over the pairs. Rewards are beta * (pi - ref) of each side; reward accuracy is the fraction of
pairs whose chosen reward is the larger; the margin is chosen's minus rejected's.

The reference model is the starting weights, frozen and in eval mode: for a LoRA model, the same model
with its adapters disabled (peft's `disable_adapter()`; no second copy); otherwise a frozen copy, kept
outside the module tree (so it is neither trained, nor checkpointed, nor seen by the optimizer or by
Composer's FSDP2). The copy is made in two steps, because the starting weights may not exist yet when
the model is built (`init_device` meta: initialised or loaded after sharding; mixed: only global rank 0
has them until Composer broadcasts them):

1. here, a skeleton on meta: the model's structure and ties, no memory;
2. `make_reference`, called by the `FrozenReference` callback at Composer's `BEFORE_LOAD` event: the
   policy's weights are real (sharded and initialised, or broadcast) and no checkpoint has been read,
   so a resumed run's reference is again the model section's starting weights. Under FSDP2 the
   skeleton is sharded like the policy (`fully_shard` on its mesh, per block then the whole) and each
   rank copies its own shard; its forward gathers the weights as the policy's does. Without FSDP2
   (one process, or DDP) it holds full weights, rank 0's on every rank (mixed: the others' are not
   the starting weights yet, as DDP broadcasts rank 0's only after the checkpoint load).

A model used outside `train()` makes its reference from the policy at its first forward.

Pairs prepared with `data-prep preference --reference_model` carry the reference log-probabilities
(`reference_logps`: [B, 2], packed [R, P, 2]); they are used as they are, and a run whose training
pairs all carry them (`precomputed_reference`) keeps no frozen copy.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Annotated, List, Literal, Optional

import torch
import torch.nn.functional as F
from composer.core import Callback
from composer.distributed.fsdp2 import create_mixed_precision_policy
from composer.utils import dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torchmetrics import Metric

from llmfoundry_lite import registry
from llmfoundry_lite.assembly.lora import base_model, is_peft
from llmfoundry_lite.assembly.sharding import apply_fsdp, retie, shared_parameters
from llmfoundry_lite.config import cross, join, rule
from llmfoundry_lite.data.preference import sequence_logps, token_logps
from llmfoundry_lite.errors import DataError
from llmfoundry_lite.models.mpt import IGNORE_INDEX
from llmfoundry_lite.training.objectives.base import Objective
from llmfoundry_lite.training.objectives.crossentropy import ComposerMPTCausalLM

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DPOSection:
    """`model.dpo`: the options of `loss_fn: dpo`, Direct Preference Optimization."""
    beta: Annotated[float, rule(lambda v: v > 0, "must be positive")] = 0.1  # how far from the reference to go
    # conservative DPO: the probability that a pair's preference label is flipped
    label_smoothing: Annotated[float, rule(lambda v: 0 <= v < 0.5, "must be in [0, 0.5)")] = 0.0
    variant: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO's logistic loss, or IPO's squared one

    @cross("label_smoothing", "variant")
    def _smoothing_is_dpos(self, path: str):
        if self.variant == "ipo" and self.label_smoothing:
            return f"{join(path, 'label_smoothing')}: applies to variant sigmoid only; remove it for ipo"

# metric name -> key of the outputs it averages over pairs
METRICS = {"DPOLoss": "losses", "RewardsChosen": "rewards_chosen", "RewardsRejected": "rewards_rejected",
           "RewardAccuracy": "reward_accuracy", "RewardMargin": "reward_margin",
           "LogpsChosen": "logps_chosen", "LogpsRejected": "logps_rejected"}


def segment_logps(logits: torch.Tensor, labels: torch.Tensor, sequence_id: torch.Tensor, segments: int
                  ) -> torch.Tensor:
    """[N, segments]: per row, the sum of the labelled positions' log-probs of each sequence_id 0..segments-1
    (a position counts for the sequence of the label it predicts; padding, -1, for none)."""
    logps = token_logps(logits, labels)
    seq = F.pad(sequence_id[:, 1:], (0, 1), value=-1)
    out = torch.zeros(logps.shape[0], segments, dtype=logps.dtype, device=logps.device)
    return out.scatter_add(1, seq.clamp(min=0), logps.masked_fill(seq < 0, 0))


def pair_logps(logits: torch.Tensor, batch) -> tuple:
    """(chosen, rejected): one log-probability per pair of the batch whose model inputs (`model_inputs`) gave
    `logits`; packed pairs in row order."""
    if "pair_mask" in batch:
        mask = batch["pair_mask"]
        per_sequence = segment_logps(logits, batch["labels"], batch["sequence_id"], 2 * mask.shape[1])
        return per_sequence[:, 0::2][mask], per_sequence[:, 1::2][mask]
    logps = sequence_logps(logits, pair_rows(batch["labels"]))
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def model_inputs(batch) -> dict:
    """The model's keyword inputs for a batch of pairs: packed rows as they are (with sequence_id), or the
    `[B, 2, L]` layout as 2B rows (`pair_rows`)."""
    if "pair_mask" in batch:
        return {k: batch[k] for k in ("input_ids", "attention_mask", "sequence_id")}
    return {k: pair_rows(batch[k]) for k in ("input_ids", "attention_mask")}


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             label_smoothing: float = 0.0, variant: str = "sigmoid"):
    """The loss and the per-pair quantities the metrics average (see the module docstring)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen, rejected = beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()
    return {"loss": losses.mean(), "losses": losses.detach(), "rewards_chosen": chosen, "rewards_rejected": rejected,
            "reward_accuracy": (chosen > rejected).float(), "reward_margin": chosen - rejected,
            "logps_chosen": policy_chosen.detach(), "logps_rejected": policy_rejected.detach()}


def pairs_in_batch(batch) -> int:
    """Composer's sample count of a batch of pairs: `[B, 2, L]` holds B, packed rows `pair_mask`'s count.
    Microbatches are weighted by it (so a step's loss is the mean over its pairs) and the sample counter
    (a resumed StreamingDataset's position) counts pairs, not rows."""
    return int(batch["pair_mask"].sum()) if "pair_mask" in batch else batch["input_ids"].shape[0]


class PairMean(Metric):
    """The mean over pairs of one key of the DPO outputs."""
    full_state_update = False

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, outputs) -> None:
        values = outputs[self.key].detach()
        self.total += values.double().sum().to(self.total.device)
        self.count += values.numel()

    def compute(self):
        return (self.total / self.count.clamp(min=1)).float()


def pair_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, 2, L] -> [2B, L]: the B chosen rows, then the B rejected rows."""
    return x.transpose(0, 1).reshape(-1, x.shape[-1])


# Mean |policy - stored reference| log-probability per reply token on a fresh run's first batch above
# which the stored values cannot be the starting model's: bf16 rounding gives about 0.01, another
# model (base vs SFT) tenths or more.
STORED_REFERENCE_TOLERANCE = 0.05


def warn_if_not_the_start(policy, reference, labels: torch.Tensor) -> None:
    """Warn when the reference log-probabilities stored by `data-prep preference --reference_model` are
    not those of the model a run starts from (where the policy equals the reference)."""
    gap = sum((p.detach() - r).abs().sum() for p, r in zip(policy, reference, strict=True))
    per_token = (gap / (labels != IGNORE_INDEX).sum().clamp(min=1)).item()
    if per_token > STORED_REFERENCE_TOLERANCE:
        log.warning("the pairs' stored reference_logps differ from the starting model's log-probabilities by %.3f per "
                    "reply token on the first batch (expected about 0): prepare them with data-prep preference "
                    "--reference_model set to the folder this run starts from", per_token)


class ComposerMPTDPO(ComposerMPTCausalLM):
    """The Composer model of `loss_fn: dpo`; `dpo` is the checked `model.dpo` section (or None: defaults)."""

    def __init__(self, model, tokenizer=None, dpo=None, precomputed_reference: bool = False):
        super().__init__(model, tokenizer)
        self.beta = getattr(dpo, "beta", 0.1)
        self.label_smoothing = getattr(dpo, "label_smoothing", 0.0)
        self.variant = getattr(dpo, "variant", "sigmoid")
        self.train_metrics = {name: PairMean(key) for name, key in METRICS.items()}
        self.val_metrics = {name: PairMean(key) for name, key in METRICS.items()}
        # the frozen copy's skeleton (see the module docstring); a list hides it from the module tree
        self.live_reference = is_peft(model) or not precomputed_reference
        self._frozen = [] if is_peft(model) or precomputed_reference else [_meta_copy(model).eval()]
        self._reference_made = False
        # a fresh run's first training batch tells whether stored reference log-probabilities are the
        # starting model's (`not_at_start` clears it for a run that loads weights or resumes)
        self.check_stored_reference = True

    def make_reference(self, mp_policy=None) -> None:
        """Give the frozen copy the policy's current weights (once; a LoRA model has no copy). Under
        FSDP2, `mp_policy` is the policy's mixed precision, so that both compute alike."""
        if not self._frozen or self._reference_made:
            return
        ref, first = self._frozen[0], next(self.model.parameters())
        sharded = isinstance(first, DTensor)
        if sharded:  # resharded after every forward: no backward follows that would free the gathered weights
            apply_fsdp(ref, first.device_mesh, reshard_after_forward=True, mp_policy=mp_policy)
        tied = shared_parameters(ref)
        ref.to_empty(device=first.device)
        retie(tied)  # to_empty gave each module a new parameter
        policy = dict(_named_tensors(self.model))
        with torch.no_grad():
            for name, tensor in _named_tensors(ref):
                source = policy[name]
                if isinstance(tensor, DTensor):  # sharded parameters: the same shard of the same tensor
                    if tensor.placements != source.placements:
                        raise RuntimeError(f"the frozen reference's {name} is sharded as {tensor.placements}, the "
                                           f"policy's as {source.placements}")
                    tensor, source = tensor.to_local(), source.to_local()
                tensor.copy_(source)
                if not sharded and dist.get_world_size() > 1:
                    dist.broadcast(tensor, src=0)
        ref.requires_grad_(False)
        self._reference_made = True

    @contextlib.contextmanager
    def reference(self):
        """The reference model (see the module docstring), in eval mode, for a no-grad forward."""
        if self._frozen:
            self.make_reference()
            ref = self._frozen[0]
            try:
                yield ref
            finally:
                if isinstance(ref, FSDPModule):  # FSDP2 keeps the root's gathered weights after its forward
                    ref.reshard()
            return
        training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                yield self.model
        finally:
            self.model.train(training)

    def forward(self, batch):
        inputs = model_inputs(batch)
        policy = pair_logps(self.model(**inputs).logits, batch)
        if "reference_logps" in batch:  # [B, 2], or packed [R, P, 2]
            stored = batch["reference_logps"]
            stored = stored[batch["pair_mask"]] if "pair_mask" in batch else stored
            reference = stored[:, 0], stored[:, 1]
            if self.check_stored_reference and self.training:
                self.check_stored_reference = False
                warn_if_not_the_start(policy, reference, batch["labels"])
        elif self.live_reference:
            with torch.no_grad(), self.reference() as ref:
                reference = pair_logps(ref(**inputs).logits, batch)
        else:
            raise DataError("these preference pairs carry no reference_logps, and this run keeps no reference model "
                            "(its training pairs carry them): prepare every loader's pairs with data-prep preference "
                            "--reference_model")
        return dpo_loss(*policy, *reference, self.beta, self.label_smoothing, self.variant)

    def loss(self, outputs, batch):
        return outputs["loss"]

    def eval_forward(self, batch, outputs=None):
        return outputs if outputs is not None else self.forward(batch)

    def update_metric(self, batch, outputs, metric):
        metric.update(outputs)
        return {}


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model` whose parameters and buffers are on meta: the structure and ties, no memory."""
    memo = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=False) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _named_tensors(model: torch.nn.Module):
    """(name, parameter or buffer), with activation checkpointing's wrapper left out of the names."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        yield name.replace("_checkpoint_wrapped_module.", ""), t


class FrozenReference(Callback):
    """Makes a DPO model's frozen reference (`ComposerMPTDPO.make_reference`) at `BEFORE_LOAD`: after
    Composer's FSDP2 sharded and initialised the policy (or broadcast rank 0's weights), before any
    checkpoint is read."""

    def before_load(self, state, logger) -> None:
        mp_policy = None
        if state.fsdp_config is not None:
            mp_policy = create_mixed_precision_policy(state.precision, state.fsdp_config.mixed_precision)
        state.model.make_reference(mp_policy)


def _packed_loaders(tc) -> List[str]:
    """The key paths of the loaders that pack preference pairs (`dataset.packing_ratio`)."""
    return [where for where, s in tc.loaders() if s.name == "preference" and s.config.dataset.packing_ratio is not None]


def sequence_id_problem(model_name: str, packed_loader: str, source: str = "") -> str:
    """Packed pairs share rows, so the model must keep each sequence to itself; `source`: where the
    setting comes from, when not from the YAML."""
    key = ("model.attn_config.attn_uses_sequence_id" if model_name == "mpt_causal_lm"
           else "model.config_overrides.attn_config.attn_uses_sequence_id")
    return (f"{key}: must be true to pack preference pairs ({packed_loader}.dataset.packing_ratio): the two sides of "
            f"a pair and the other pairs of a row must not attend to each other{source}; set {key}: true, or "
            f"remove {packed_loader}.dataset.packing_ratio")


def _packed_model_problems(tc, model) -> List[str]:
    """Packed pairs with a model that does not attend by sequence_id, from the built model's own config
    (an HF folder's, when the YAML does not say)."""
    packed = _packed_loaders(tc)
    if packed and not getattr(base_model(model).config, "attn_config", {}).get("attn_uses_sequence_id"):
        folder = tc.model.kwargs.get("pretrained_model_name_or_path")
        return [sequence_id_problem(tc.model.name, packed[0], f" (the config of {folder} has it false)" if folder else "")]
    return []


def _eval_problem(model, dataset) -> Optional[str]:
    if model.live_reference or getattr(dataset, "reference_logps", False):
        return None
    return ("its preference pairs carry no reference_logps, and this run keeps no reference model (its training "
            "pairs carry them): prepare the eval pairs with data-prep preference --reference_model too")


def _problems(tc) -> List[str]:
    """What `loss_fn: dpo` needs of the rest of the config."""
    model, problems = tc.model.config, []
    # the reference model is the starting weights: the base model with LoRA's fresh (no-op) adapters
    # disabled, or a frozen copy of the model
    lora = getattr(model, "peft_config", None)
    if getattr(model, "pretrained_lora_id_or_path", None):
        problems.append("model.pretrained_lora_id_or_path: loss_fn dpo takes the base model without adapters as "
                        "the reference; merge the saved adapter into a folder first (llmfoundry-lite convert) and "
                        "start from it with a fresh peft_config")
    elif lora is not None and lora.init_lora_weights is False:
        problems.append("model.peft_config.init_lora_weights: loss_fn dpo needs adapters that start as no-ops "
                        "(the reference is the base model without them); remove it")
    for where, section in tc.loaders():
        packed = section.name == "preference" and section.config.dataset.packing_ratio is not None
        if packed and where != "train_loader":
            # a packer holds pairs back for the next batch: an eval pass would miss some, and shift others
            problems.append(f"{where}.dataset.packing_ratio: packing is for training; an eval loader scores every "
                            "pair once, unpacked (remove packing_ratio)")
    packed = _packed_loaders(tc)
    if packed and tc.model.name == "mpt_causal_lm":  # what the YAML says (else the model's config: model_rules)
        uses = tc.model.config.attn_config.attn_uses_sequence_id
    elif packed and tc.model.name == "hf_causal_lm":
        attn = tc.model.config.config_overrides.get("attn_config")
        uses = attn.get("attn_uses_sequence_id") if isinstance(attn, dict) else None
    else:
        uses = None
    if uses is not None and not uses:
        problems.append(sequence_id_problem(tc.model.name, packed[0]))
    if tc.icl_tasks is not None:
        problems.append("icl_tasks: not supported with model.loss_fn dpo yet; evaluate the exported model instead")
    if tc.load_path and tc.load_weights_only and not tc.model.kwargs.get("peft_config"):
        # the frozen reference is a copy of the model section's weights, made before load_path is read:
        # right when resuming this run, wrong when starting from another checkpoint's weights
        problems.append("load_weights_only: model.loss_fn dpo without LoRA takes its reference model from the "
                        "model section's weights, not from load_path; export that checkpoint to an HF folder "
                        "(llmfoundry-lite convert --composer_path CHECKPOINT --hf_output_path FOLDER) and start "
                        "from it (model.name: hf_causal_lm, pretrained_model_name_or_path: FOLDER)")
    return problems


def _build(model, tokenizer, options, train_dataloader) -> ComposerMPTDPO:
    """Training pairs that all carry reference_logps: no frozen copy is kept (see the module docstring)."""
    return ComposerMPTDPO(model, tokenizer, options,
                          precomputed_reference=getattr(train_dataloader.dataset, "reference_logps", False))


def _no_stored_reference_check(model) -> None:
    """Weights loaded or resumed: the stored reference log-probabilities are not the starting model's."""
    model.check_stored_reference = False


registry.objectives.register("dpo", Objective(
    build=_build, accepts=lambda loader: loader == "preference",
    wrong_loader="model.loss_fn dpo trains and evaluates on preference pairs; use name: preference (got {loader})",
    options=DPOSection, rules=(_problems,), model_rules=(_packed_model_problems,), eval_problem=_eval_problem,
    samples_in_batch=pairs_in_batch, callbacks=lambda: [FrozenReference()],
    not_at_start=_no_stored_reference_check))
