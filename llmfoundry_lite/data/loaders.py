"""`train_loader` / `eval_loader` sections: their schema and `build_dataloader`.

A loader section is `{name, dataset: {...}, drop_last, num_workers, pin_memory, prefetch_factor,
persistent_workers, timeout}`; `name` picks an entry of the `dataloaders` registry (`text`,
`finetuning`, `preference`, or a plug-in's), registered with its config dataclass (the `LoaderOptions` plus its
own `dataset` schema) and a function `build(config, tokenizer, batch_size)` returning
`(dataset, collate_fn, examples_per_batch, sampler_or_None)`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Annotated, Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from streaming import Stream
from torch.utils.data import DataLoader

from llmfoundry_lite.config import Named, Positive, Section, cross, parse, rule
from llmfoundry_lite.data import collators, finetuning, preference
from llmfoundry_lite.data.mds import check_local_split
from llmfoundry_lite.data.text_dataset import StreamingTextDataset
from llmfoundry_lite.errors import DataError, UserError
from llmfoundry_lite.registry import dataloaders


@dataclass
class StreamConfig:
    """One entry of `streams`: an MDS folder and how much of it an epoch draws."""
    remote: Optional[str] = None
    local: Optional[str] = None
    split: Optional[str] = None
    proportion: Optional[float] = None
    repeat: Optional[float] = None
    choose: Optional[int] = None
    download_retry: Optional[int] = None
    download_timeout: Optional[float] = None
    validate_hash: Optional[str] = None
    keep_zip: Optional[bool] = None


@dataclass(kw_only=True)
class StreamingOptions:
    """`StreamingDataset` arguments shared by the text and (MDS) finetuning datasets."""
    remote: Optional[str] = None
    local: Optional[str] = None
    split: Optional[str] = None
    streams: Optional[Dict[str, StreamConfig]] = None  # name -> stream, as in llm-foundry
    shuffle: bool = False
    shuffle_seed: int = 9176
    shuffle_algo: str = "py1e"
    shuffle_block_size: Optional[int] = None
    num_canonical_nodes: Optional[int] = None
    predownload: Optional[int] = None
    download_retry: int = 2
    download_timeout: float = 60
    validate_hash: Optional[str] = None
    keep_zip: bool = False
    epoch_size: Optional[Union[int, str]] = None
    cache_limit: Optional[Union[int, str]] = None
    partition_algo: str = "relaxed"
    sampling_method: Literal["balanced", "fixed"] = "balanced"
    sampling_granularity: int = 1
    batching_method: Literal["random", "stratified", "per_stream", "device_per_stream"] = "random"
    replication: Optional[int] = None

    def streaming_kwargs(self, batch_size: int) -> Dict[str, Any]:
        own = {f.name for f in dataclasses.fields(StreamingOptions)}
        kwargs = {k: v for k, v in vars(self).items() if k in own and k != "streams" and v is not None}
        if self.streams:
            kwargs["streams"] = [Stream(**{k: v for k, v in vars(s).items() if v is not None})
                                 for s in self.streams.values()]
        return {**kwargs, "batch_size": batch_size}

    @cross("local", "remote", "split", "streams")
    def _one_source(self, path: str) -> List[str]:
        if not (self.local or self.remote or self.streams):
            return [f"{path}: give `local`/`remote` (with `split`) or `streams`"]
        if self.streams and (self.local or self.remote):
            return [f"{path}: give either `streams` or `local`/`remote`, not both"]
        problems = []
        for where, s in [(path, self)] + [(f"{path}.streams.{n}", s) for n, s in (self.streams or {}).items()]:
            if s.local and not s.remote:  # a local-only split must be there now: streaming would fail mid-setup
                try:
                    check_local_split(os.path.join(s.local, s.split or self.split or ""))
                except DataError as e:
                    problems.append(f"{where}.local: {e}")
        return problems


@dataclass(kw_only=True)
class TextDatasetConfig(StreamingOptions):
    max_seq_len: Positive
    token_encoding_type: Literal["int32", "int64", "uint16"] = "int32"  # of a raw-bytes `tokens` column
    eos_token_id: Optional[int] = None  # emit `sequence_id`: EOS ends a document inside a row


# examples (pairs) drawn per packed row: a number, or `auto` (the most that packs without dropping any)
PackingRatio = Union[Annotated[float, rule(lambda v: v >= 1, "must be >= 1 (or 'auto')")], Literal["auto"]]


@dataclass(kw_only=True)
class ExamplesConfig(StreamingOptions):
    """What the finetuning and preference datasets share: raw rows from `hf_name` (a hub name or a local
    file or folder, read and tokenized when the run starts) or MDS shards written by data-prep
    (`local`/`remote`/`streams`)."""
    max_seq_len: Positive
    hf_name: Optional[str] = None
    hf_kwargs: Dict[str, Any] = field(default_factory=dict)
    preprocessing_fn: Optional[str] = None
    chat_template: Optional[str] = None
    packing_ratio: Optional[PackingRatio] = None  # pack several examples (pairs) per row
    max_leftover_bins_to_keep: Optional[int] = None
    allow_pad_trimming: bool = False  # unpacked: pad to the longest sequence of the batch, not max_seq_len
    # only decoder-only (MPT) models are supported
    decoder_only_format: Annotated[bool, rule(bool, "only decoder-only (MPT) models; set it to true")] = True

    @cross("hf_name", "local", "remote", "split", "streams")
    def _one_source(self, path: str) -> List[str]:
        if not self.hf_name:
            return super()._one_source(path)
        if self.local or self.remote or self.streams:
            return [f"{path}: give either `hf_name` or MDS `local`/`remote`/`streams`, not both"]
        return []


@dataclass(kw_only=True)
class FinetuningDatasetConfig(ExamplesConfig):
    target_prompts: str = "none"
    target_responses: Literal["last", "all"] = "last"

    @cross("target_prompts")
    def _known_target_prompts(self, path: str):
        try:
            finetuning.parse_target_prompts(self.target_prompts)
        except UserError as e:
            return f"{path}.{e}"


@dataclass(kw_only=True)
class PreferenceDatasetConfig(ExamplesConfig):
    """Preference pairs (data/preference.py): raw rows (JSON/JSONL/CSV/Parquet, a hub name; e.g.
    preprocessing_fn hh_rlhf) or MDS written by `data-prep preference` (with reference_logps or not)."""

    @cross("hf_name", "preprocessing_fn", "chat_template")
    def _read_from_rows(self, path: str):
        if not self.hf_name and (self.preprocessing_fn or self.chat_template):
            return (f"{path}: preprocessing_fn and chat_template apply to rows read from hf_name; MDS pairs were "
                    "rendered and tokenized by data-prep preference (pass --preprocessor / --chat_template there)")


@dataclass(kw_only=True)
class LoaderOptions:
    """The keys every loader section has besides `name` and `dataset` (torch DataLoader arguments)."""
    label: Optional[str] = None  # names an eval loader's metrics in an `eval_loader` list
    drop_last: bool = False
    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: Optional[int] = None
    persistent_workers: bool = False
    timeout: float = 0

    @cross("num_workers", "prefetch_factor", "persistent_workers")
    def _workers(self, path: str):
        if self.num_workers == 0 and (self.prefetch_factor is not None or self.persistent_workers):
            return f"{path}: prefetch_factor and persistent_workers need num_workers > 0"


@dataclass(kw_only=True)
class TextLoader(LoaderOptions):
    dataset: TextDatasetConfig


@dataclass(kw_only=True)
class FinetuningLoader(LoaderOptions):
    dataset: FinetuningDatasetConfig


@dataclass(kw_only=True)
class PreferenceLoader(LoaderOptions):
    dataset: PreferenceDatasetConfig


# `eval_loader`: one loader, or a list of them each with a distinct `label`.
EvalLoaders = Union[Named[dataloaders], List[Named[dataloaders]]]


def labelled_loaders(eval_loader) -> List[Tuple[str, Section]]:
    """[(label, loader section)] of an `eval_loader` value (None: no eval loaders)."""
    if eval_loader is None:
        return []
    if isinstance(eval_loader, Section):
        return [(eval_loader.config.label or "eval", eval_loader)]
    return [(s.config.label or f"eval_{i}", s) for i, s in enumerate(eval_loader)]


def eval_loader_problems(eval_loader) -> List[str]:
    labels = [s.config.label for s in eval_loader] if isinstance(eval_loader, list) else []
    if len(labels) > 1 and (None in labels or len(set(labels)) != len(labels)):
        return ["eval_loader: a list of eval loaders needs a distinct `label` on each"]
    return []


def build_dataloader(section: Union[Section, Dict[str, Any]], tokenizer, device_batch_size: int,
                     path: str = "train_loader") -> DataLoader:
    """The DataLoader of a loader section (checked here when it is a plain mapping)."""
    if not isinstance(section, Section):
        section = parse(Named[dataloaders], section, path, header=f"invalid {path}")
    loader = section.config
    dataset, collate_fn, batch_size, sampler = dataloaders.get(section.name)(loader, tokenizer, device_batch_size)
    extra = {"prefetch_factor": loader.prefetch_factor} if loader.prefetch_factor is not None else {}
    dataloader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, sampler=sampler,
                            drop_last=loader.drop_last, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                            persistent_workers=loader.persistent_workers, timeout=loader.timeout, **extra)
    if len(dataloader) == 0:  # an epoch without batches: a run measured in batches would never end
        raise DataError(f"{path} yields no batches: this process gets {len(dataset)} examples, fewer than one batch "
                        f"of {batch_size}{' with drop_last: true' if loader.drop_last else ''}. Add data, lower the "
                        "batch size (global_train_batch_size / device_eval_batch_size) or set drop_last: false")
    return dataloader


@dataloaders.register("text", config=TextLoader)
def _build_text(loader: TextLoader, tokenizer, batch_size: int):
    cfg = loader.dataset
    dataset = StreamingTextDataset(tokenizer, cfg.max_seq_len, cfg.token_encoding_type,
                                   **cfg.streaming_kwargs(batch_size))
    return dataset, collators.CausalLMCollator(tokenizer.pad_token_id, cfg.max_seq_len, cfg.eos_token_id), batch_size, None


@dataloaders.register("finetuning", config=FinetuningLoader)
def _build_finetuning(loader: FinetuningLoader, tokenizer, batch_size: int):
    cfg = loader.dataset
    if cfg.hf_name:
        raw = finetuning.load_raw_examples(cfg.hf_name, cfg.split or "train", cfg.hf_kwargs)
        dataset = finetuning.FinetuningDataset(raw, tokenizer, cfg.max_seq_len, cfg.preprocessing_fn,
                                               cfg.target_prompts, cfg.target_responses, cfg.chat_template)
        sampler = map_sampler(dataset, cfg.shuffle, cfg.shuffle_seed)
    else:
        dataset = finetuning.streaming_finetuning_dataset(
            tokenizer, cfg.max_seq_len, cfg.target_prompts, cfg.target_responses, cfg.chat_template,
            **cfg.streaming_kwargs(batch_size))
        sampler = None
    if cfg.packing_ratio is None:
        collate = collators.FinetuningCollator(tokenizer.pad_token_id, cfg.max_seq_len, cfg.allow_pad_trimming)
        return dataset, collate, batch_size, sampler
    collate = collators.PackingCollator(tokenizer.pad_token_id, cfg.max_seq_len, batch_size,
                                        cfg.max_leftover_bins_to_keep)
    return dataset, collate, _packed_batch(cfg, dataset, collate, batch_size), sampler


@dataloaders.register("preference", config=PreferenceLoader)
def _build_preference(loader: PreferenceLoader, tokenizer, batch_size: int):
    """Batches of `batch_size` pairs, `[B, 2, L]` (data/collators.py `PreferenceCollator`), or with
    `packing_ratio`, `batch_size` rows of packed pairs (`PreferencePackingCollator`)."""
    cfg = loader.dataset
    packed = cfg.packing_ratio is not None
    if cfg.hf_name:
        raw = finetuning.load_raw_examples(cfg.hf_name, cfg.split or "train", cfg.hf_kwargs)
        dataset = preference.PreferenceDataset(raw, tokenizer, cfg.max_seq_len, cfg.preprocessing_fn, cfg.chat_template,
                                               packed)
        sampler = map_sampler(dataset, cfg.shuffle, cfg.shuffle_seed)
    else:
        dataset = preference.streaming_preference_dataset(cfg.max_seq_len, packed, **cfg.streaming_kwargs(batch_size))
        sampler = None
    if not packed:
        return dataset, collators.PreferenceCollator(tokenizer.pad_token_id, cfg.max_seq_len,
                                                     cfg.allow_pad_trimming), batch_size, sampler
    collate = collators.PreferencePackingCollator(tokenizer.pad_token_id, cfg.max_seq_len, batch_size,
                                                  cfg.max_leftover_bins_to_keep)
    return dataset, collate, _packed_batch(cfg, dataset, collate, batch_size), sampler


def _packed_batch(cfg, dataset, collate, rows: int) -> int:
    """How many examples (pairs) a batch of `rows` packed rows draws: `packing_ratio` times the rows; `auto`:
    the largest ratio at which the first 4096 examples' packed lengths pack without piling up leftovers."""
    ratio = cfg.packing_ratio
    if ratio == "auto":
        lengths = [collate.length(collate.item(dataset[i])) for i in range(min(len(dataset), 4096))]
        ratio = collators.auto_packing_ratio(lengths, cfg.max_seq_len, rows, cfg.shuffle_seed)
    return max(rows, int(rows * ratio))


def map_sampler(dataset, shuffle: bool, seed: int):
    """One order of the whole set (reshuffled each epoch from `seed`) of which each of the N ranks takes
    every N-th example: a global batch holds the same examples on any number of ranks, so a run resumed
    on another world size continues where it stopped (Composer skips the batches already trained)."""
    on = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.utils.data.DistributedSampler(
        dataset, num_replicas=None if on else 1, rank=None if on else 0, shuffle=shuffle, seed=seed)
