"""Training-side data: megatron-core GPTDataset / BlendedMegatronDatasetBuilder over prepared .bin/.idx files, and a
deterministic, resumable batch order (global sample index = iteration * global_batch + position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from evolm_nemo.config.schema import RootConfig


@dataclass(frozen=True)
class DataSource:
    paths: list[str]
    weights: list[float] | None
    tokenizer: str


def resolve_source(cfg: RootConfig) -> DataSource:
    """Where the token files and tokenizer are. The synthetic corpus is generated on rank 0 on first use."""
    d = cfg.data
    if d.source == "indexed":
        return DataSource(list(d.paths), list(d.weights) if d.weights else None, str(d.tokenizer))
    from evolm_nemo.data.synthetic import ensure_synthetic

    def build():
        text = ensure_synthetic(d.cache_dir, d.synthetic_docs, d.synthetic_seed, vocab_size=cfg.model.vocab_size)
        others = [ensure_synthetic(d.cache_dir, d.synthetic_docs, d.synthetic_seed + i, kind=kind,
                                   tokenizer_dir=text.tokenizer_dir) for i, kind in enumerate(d.synthetic_kinds[1:], 1)]
        return [text, *others]

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        build()
    if dist.is_initialized():
        dist.barrier()
    corpora = build()
    return DataSource([str(c.prefix) for c in corpora], list(d.weights) if d.weights else None,
                      str(corpora[0].tokenizer_dir))


def build_dataset(cfg: RootConfig, source: DataSource, tokenizer, num_samples: int):
    """The training split as one megatron dataset (a BlendedDataset when several paths are mixed)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from evolm_nemo.data.tokenizer import MegatronHFTokenizer

    cache = Path(cfg.data.cache_dir) / "index_cache"
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.model.seq_length,
        blend=(source.paths, source.weights),
        split=cfg.data.split,
        tokenizer=MegatronHFTokenizer(tokenizer),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=str(cache),
    )
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Rank 0 builds and caches the sample indices; the others then read the cache (no concurrent writers).
    train = None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [num_samples, 0, 0], lambda: True,
                                                        config).build()
        if dist.is_initialized():
            dist.barrier()
    return train


class BatchSchedule:
    """Microbatches of one iteration for this data-parallel rank, from global sample indices.

    Iteration ``it`` uses samples ``[it*gbs, (it+1)*gbs)``; dp rank ``r`` takes the ``r``-th contiguous slice. The
    order depends only on the iteration, so a resumed run sees exactly the data the uninterrupted run saw.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int):
        self.dataset = dataset
        self.gbs, self.mbs = global_batch, micro_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def microbatches(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        per_rank = self.gbs // self.dp_size
        start = iteration * self.gbs + self.dp_rank * per_rank
        out = []
        for m in range(0, per_rank, self.mbs):
            samples = [self.dataset[start + m + i] for i in range(self.mbs)]
            out.append({k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                        for k in ("tokens", "labels", "loss_mask", "position_ids")})
        return out
