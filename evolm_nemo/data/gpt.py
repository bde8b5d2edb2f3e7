"""Training-side data: megatron-core GPTDataset / BlendedMegatronDatasetBuilder over prepared .bin/.idx files, and a
deterministic, resumable batch order (global sample index = iteration * global_batch + position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens
from evolm_nemo.data.indexed import expand_prefixes, prefix_tokens
from evolm_nemo.data.synthetic import ensure_synthetic
from evolm_nemo.data.tokenizer import MegatronHFTokenizer


@dataclass(frozen=True)
class DataSource:
    paths: list[str]
    weights: list[float] | None
    tokenizer: str
    groups: list[int] | None = None  # the data.paths source of each path (a sharded source has several)
    val_paths: list[str] | None = None  # held-out token files (data.val_paths / synthetic_val_docs), else None
    val_groups: list[int] | None = None  # the source of each held-out path

    def trained(self) -> tuple[list[str], list[float] | None, list[int]]:
        """The paths training mixes, their weights and sources: a path of weight 0 is left out (only measured: its
        held-out loss, as CPT without replay still watches general text)."""
        groups = list(self.groups) if self.groups else list(range(len(self.paths)))
        if not self.weights or 0 not in self.weights:
            return list(self.paths), self.weights, groups
        keep = [i for i, w in enumerate(self.weights) if w > 0]
        return [self.paths[i] for i in keep], [self.weights[i] for i in keep], [groups[i] for i in keep]


VAL_SEED_OFFSET = 100_000  # synthetic held-out corpora: seed = the corpus's seed + this (never a training seed)


def resolve_source(cfg: RootConfig) -> DataSource:
    """Where the token files and tokenizer are. The synthetic corpus is generated on rank 0 on first use."""
    d = cfg.data
    if d.source == "indexed":  # a sharded preparation (<prefix>.manifest.json) becomes its shards
        paths, weights, groups = expand_prefixes(list(d.paths), list(d.weights) if d.weights else None)
        val_paths = val_groups = None
        if d.val_paths:
            val_paths, _, val_groups = expand_prefixes(list(d.val_paths), None)
        return DataSource(paths, weights, str(d.tokenizer), groups, val_paths, val_groups)
    def build():
        text = ensure_synthetic(d.cache_dir, d.synthetic_docs, d.synthetic_seed, vocab_size=cfg.model.vocab_size)
        others = [ensure_synthetic(d.cache_dir, d.synthetic_docs, d.synthetic_seed + i, kind=kind,
                                   tokenizer_dir=text.tokenizer_dir) for i, kind in enumerate(d.synthetic_kinds[1:], 1)]
        held = [ensure_synthetic(d.cache_dir, d.synthetic_val_docs, d.synthetic_seed + VAL_SEED_OFFSET + i, kind=kind,
                                 tokenizer_dir=text.tokenizer_dir) for i, kind in enumerate(d.synthetic_kinds)
                if d.synthetic_val_docs > 0]
        return [text, *others], held

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        build()
    if dist.is_initialized():
        dist.barrier()
    corpora, held = build()
    return DataSource([str(c.prefix) for c in corpora], list(d.weights) if d.weights else None,
                      str(corpora[0].tokenizer_dir), None, [str(c.prefix) for c in held] or None,
                      list(range(len(held))) or None)


def _build_splits(cfg: RootConfig, paths, weights, tokenizer, sizes, split: str | None = None):
    """megatron's (train, valid, test) datasets of one blend, built with ``sizes`` samples per split (``split``:
    the documents' split, default data.split)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cache = Path(cfg.data.cache_dir) / "index_cache"
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(list(paths), list(weights) if weights else None),
        split=split or cfg.data.split,
        tokenizer=MegatronHFTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Rank 0 builds and caches the sample indices; the others then read the cache (no concurrent writers).
    splits = None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            splits = BlendedMegatronDatasetBuilder(GPTDataset, list(sizes), lambda: True, config).build()
        if dist.is_initialized():
            dist.barrier()
    return splits


def build_dataset(cfg: RootConfig, source: DataSource, tokenizer, num_samples: int):
    """The training split as one megatron dataset (a BlendedDataset when several paths are mixed) of the paths
    ``source.trained()`` keeps."""
    paths, weights, _ = source.trained()
    if len(paths) > 1 and weights is None:  # in proportion to size, stated: megatron's unweighted blend holds one
        weights = [float(prefix_tokens(p)) for p in paths]  # pass only and runs out where data.max_epochs allows more
    return _build_splits(cfg, paths, weights, tokenizer, [num_samples, 0, 0])[0]


def build_validation(cfg: RootConfig, source: DataSource, tokenizer, names: list[str], num_samples: int) -> dict:
    """{source name: megatron dataset} of each source's held-out (valid) split, ``num_samples`` samples each -- the
    same documents whatever the mix, so losses compare across runs (a sharded source: all its shards). With held-out
    files (data.val_paths, data.synthetic_val_docs) each source's are read whole instead."""
    held = source.val_paths is not None
    all_paths = source.val_paths if held else source.paths
    groups = (source.val_groups if held else source.groups) or list(range(len(all_paths)))
    out = {}
    for s, name in enumerate(names):
        members = [i for i, g in enumerate(groups) if g == s]
        paths = [all_paths[i] for i in members]
        weights = [source.weights[i] for i in members] if not held and source.weights and len(members) > 1 else None
        if len(paths) > 1 and weights is None:
            weights = [float(prefix_tokens(p)) for p in paths]
        out[name] = _build_splits(cfg, paths, weights, tokenizer, [0, num_samples, 0],
                                  split="0,100,0" if held else None)[1]
    return out


class BatchSchedule:
    """Microbatches of one iteration for this data-parallel rank, from global sample indices.

    Iteration ``it`` uses samples ``[it*gbs, (it+1)*gbs)``; dp rank ``r`` takes the ``r``-th contiguous slice. The
    order depends only on the iteration, so a resumed run sees exactly the data the uninterrupted run saw.

    Each microbatch's token ids are checked against ``vocab_size`` as it is read (an id past the embedding would be
    an index error deep in the forward pass -- a device-side assert on GPU): ``check_token_ids`` reads a large
    ``.bin`` only in part before the run.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 vocab_size: int | None = None):
        self.dataset = dataset
        self.gbs, self.mbs = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.vocab_size = vocab_size

    def microbatches(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.gbs // self.dp_size
        start = iteration * self.gbs + self.dp_rank * per_rank
        out = []
        for m in range(0, per_rank, self.mbs):
            samples = [self.dataset[start + m + i] for i in range(self.mbs)]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                     for k in ("tokens", "labels", "loss_mask", "position_ids")}
            if self.vocab_size is not None and max(int(batch["tokens"].max()),
                                                   int(batch["labels"].max())) >= self.vocab_size:
                self._refuse(start + m, samples)
            out.append(batch)
        return out

    def _refuse(self, first: int, samples: list[dict]) -> None:
        for i, sample in enumerate(samples):
            top = max(int(torch.as_tensor(sample["tokens"]).max()), int(torch.as_tensor(sample["labels"]).max()))
            if top >= self.vocab_size:
                ds = self.dataset
                if "dataset_id" in sample:  # a blend: the source it drew from
                    ds = ds.datasets[int(sample["dataset_id"])]
                where = f"{ds.dataset_path}.bin: " if getattr(ds, "dataset_path", None) else ""
                raise ConfigError("data.paths", f"{where}sample {first + i:,} holds token id {top} >= "
                                                f"model.vocab_size={self.vocab_size}; it was tokenized with a larger "
                                                "vocabulary than the model's (check data.tokenizer and "
                                                "model.vocab_size)")


def source_names(cfg: RootConfig, source: DataSource) -> list[str]:
    """One short, unique name per blended source: the synthetic kinds, else each prefix's file name."""
    raw = list(cfg.data.synthetic_kinds) if cfg.data.source == "synthetic" else [Path(p).name for p in cfg.data.paths]
    names: list[str] = []
    for name in raw:
        names.append(name if name not in names else f"{name}_{len(names)}")
    return names


class SourceTokens:
    """Tokens each source of a blend has contributed to training after ``step`` optimizer steps, read from megatron's
    blending index (sample ``g`` of the train split comes from source ``dataset_index[g]``, and every sample is
    ``seq_length`` loss tokens of that one source). A pure function of the step, so resumed and branched runs count
    what they trained on; no communication (every rank knows the whole global batch)."""

    def __init__(self, dataset, names: list[str], global_batch: int, seq_length: int, groups=None):
        import numpy as np

        self.names, self.gbs, self.seq = list(names), global_batch, seq_length
        index = getattr(dataset, "dataset_index", None)
        if index is None and hasattr(dataset, "path_to_dataset_index"):  # deferred mmap
            index = np.load(dataset.path_to_dataset_index, allow_pickle=False, mmap_mode="r")
        self.index = index
        weights = list(getattr(dataset, "weights", None) or []) if index is not None else []
        self.groups = np.asarray(groups if groups is not None else range(max(len(weights), 1)), dtype=np.int64)
        plan = np.zeros(len(names))
        if weights:
            np.add.at(plan, self.groups[: len(weights)], np.asarray(weights, dtype=np.float64))
        elif index is None:  # one trained path (the others of weight 0): every sample is its source's
            plan[self.groups[0]] = 1.0
        self.plan = list(plan / plan.sum()) if plan.sum() > 0 else [1.0 / len(names)] * len(names)
        self._step, self._counts = 0, np.zeros(len(names), dtype=np.int64)

    def _by_source(self, part):
        import numpy as np

        per_path = np.bincount(np.asarray(part, dtype=np.int64), minlength=len(self.groups))[: len(self.groups)]
        out = np.zeros(len(self.names), dtype=np.int64)
        np.add.at(out, self.groups, per_path)
        return out

    def samples(self, step: int):
        """Samples per source in the first ``step`` global batches."""
        import numpy as np

        if self.index is None:
            out = np.zeros(len(self.names), dtype=np.int64)
            out[self.groups[0]] = step * self.gbs
            return out
        if step == self._step + 1:
            self._counts = self._counts + self._by_source(self.index[self._step * self.gbs: step * self.gbs])
        elif step != self._step:
            self._counts = self._by_source(self.index[: step * self.gbs])
        self._step = step
        return self._counts

    def tokens(self, step: int) -> dict[str, int]:
        return {n: int(c) * self.seq for n, c in zip(self.names, self.samples(step))}

    def deviation(self, step: int) -> float:
        """Largest relative difference between a source's tokens and its planned share of all tokens so far."""
        counts = self.samples(step)
        total = float(counts.sum())
        return max(abs(c / total - p) / p for c, p in zip(counts, self.plan) if p > 0) if total else 0.0

    def summary(self, step: int) -> str:
        tokens = self.tokens(step)
        total = sum(tokens.values()) or 1
        parts = [f"{n} {format_tokens(t)} ({t / total:.2%}, plan {p:.2%})" for (n, t), p in
                 zip(tokens.items(), self.plan)]
        return f"tokens per source after {step:,} iterations: " + ", ".join(parts) + \
            f"; largest deviation from the plan {self.deviation(step):.3%}"
