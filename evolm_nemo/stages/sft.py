"""SFT: prompt-masked fine-tuning on prepared SFT datasets (``evolm prepare-sft``), from ``train.init_from``.

Data order: the global sample index ``g = iteration * global_batch + position`` maps to epoch ``g // N`` and to
position ``g % N`` of that epoch's permutation (seeded by ``train.seed`` and the epoch; ``sft.shuffle=false`` keeps
the dataset order). Data-parallel rank ``r`` takes the ``r``-th contiguous slice of the global batch, split into
microbatches. So the order depends only on the iteration: a resumed run sees exactly what the uninterrupted one saw.

A microbatch is right-padded to its longest example (all microbatches of a step to the step's longest when pp > 1,
since pipeline stages exchange one activation shape); the loss mask is 1 on the positions that predict answer tokens
(EOS included), 0 on the prompt and on padding. ``parallel.max_tokens_per_microbatch`` forms microbatches by a token
budget instead of a count, and ``train.packing`` lays a rank's examples into packed rows (``data.packing``): the same
examples, the same loss, another layout. Examples longer than ``model.seq_length + 1`` tokens are truncated or
dropped (``sft.overlength``), counted in the run header.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.packing import best_fit, by_count, by_token_budget, collate_packed, round_up, row_multiple
from evolm_nemo.data.sft import SFTDataset, Template, collate, read_manifest, tokenizer_fingerprint
from evolm_nemo.data.sft_synthetic import ensure_synthetic_sft
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.stages import check_budget_keys
from evolm_nemo.stages.base import (EpochOrder, Stage, batch_identity, check_layout,
                                   dataset_identity, epoch_iters)

OVERLENGTH = ("truncate", "drop")


# ------------------------------------------------------------------------------------------------- data and plan


def dataset_dirs(cfg: RootConfig) -> list[str]:
    """The SFT dataset directories: ``data.paths`` (``data.source=indexed``) or the generated demo set."""
    d = cfg.data
    if d.source == "synthetic":
        return [str(ensure_synthetic_sft(cfg).sft_dir)]
    if d.source != "indexed":
        raise ConfigError("data.source", f"stage=sft reads prepared datasets (indexed) or generates one (synthetic), "
                                         f"not {d.source!r}")
    if not d.paths:
        raise ConfigError("data.paths", "stage=sft needs SFT dataset directories from `evolm prepare-sft` "
                                        "(data.paths=[dir]), or data.source=synthetic for the generated demo set")
    if d.weights is not None:
        raise ConfigError("data.weights", "SFT datasets are concatenated, not mixed by weight; set data.weights=null")
    for path in d.paths:
        if not Path(path).is_dir():
            raise ConfigError("data.paths", f"no SFT dataset directory {path}; run `evolm prepare-sft` first")
    return list(d.paths)


@dataclass
class SFTView:
    """The examples training uses, after the overlength policy: parallel arrays over kept examples."""

    sets: list[SFTDataset]
    which: np.ndarray  # dataset of each kept example
    local: np.ndarray  # its index in that dataset
    length: np.ndarray  # ids used (after truncation)
    prompt_len: np.ndarray
    truncated: int
    dropped: int

    def __len__(self) -> int:
        return len(self.which)

    @property
    def answer_len(self) -> np.ndarray:
        return self.length - self.prompt_len

    def ids(self, i: int) -> np.ndarray:
        return self.sets[self.which[i]].ids(int(self.local[i]))[: self.length[i]]


def load_view(cfg: RootConfig, dirs: list[str]) -> SFTView:
    limit = cfg.model.seq_length + 1  # ids of one example: seq_length inputs + the last label
    sets = [SFTDataset(d, vocab_size=cfg.model.vocab_size, cache_dir=cfg.data.cache_dir) for d in dirs]
    which, local, length, prompt = [], [], [], []
    truncated = dropped = 0
    for k, ds in enumerate(sets):
        over = ds.length > limit
        too_long_prompt = ds.prompt_len >= limit  # nothing of the answer would fit
        drop = over if cfg.sft.overlength == "drop" else too_long_prompt
        keep = ~drop
        truncated += int((over & keep).sum())
        dropped += int(drop.sum())
        idx = np.nonzero(keep)[0]
        which.append(np.full(len(idx), k, dtype=np.int64))
        local.append(idx)
        length.append(np.minimum(ds.length[idx], limit))
        prompt.append(ds.prompt_len[idx])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)  # noqa: E731
    return SFTView(sets, cat(which), cat(local), cat(length), cat(prompt), truncated, dropped)


def _check_tokenizers(cfg: RootConfig, view: SFTView) -> str:
    """All datasets share one tokenizer and it is the parent checkpoint's (and ``data.tokenizer``'s, if set).
    Returns the tokenizer reference the run records."""
    first = view.sets[0].manifest["tokenizer"]
    for ds in view.sets[1:]:
        if ds.manifest["tokenizer"]["vocab_sha256"] != first["vocab_sha256"]:
            raise ConfigError("data.paths", f"{ds.path} and {view.sets[0].path} were tokenized with different "
                                            "tokenizers; prepare them with the same one")
    checks = []
    if cfg.train.init_from:
        parent_ref = ckpt.parent_tokenizer(cfg.train.init_from, key="train.init_from")
        if parent_ref:
            checks.append(("train.init_from", parent_ref))
    if cfg.data.tokenizer:
        checks.append(("data.tokenizer", cfg.data.tokenizer))
    for key, ref in checks:
        fp = tokenizer_fingerprint(load_tokenizer(ref, key=key))
        if fp["vocab_sha256"] != first["vocab_sha256"]:
            raise ConfigError("data.paths", f"{view.sets[0].path} was tokenized with {first['ref']} (vocab "
                                            f"{first['vocab_sha256']}), but {key} uses {ref} (vocab "
                                            f"{fp['vocab_sha256']}); run `evolm prepare-sft tokenizer={ref}` again")
    return checks[0][1] if checks else first["ref"]


def plan_iters(cfg: RootConfig, dp: int) -> int:
    s = cfg.sft
    check_budget_keys(cfg)  # before any data is read
    if s.overlength not in OVERLENGTH:
        raise ConfigError("sft.overlength", f"must be one of {', '.join(OVERLENGTH)}; got {s.overlength!r}")
    if s.pad_to_multiple_of < 1:
        raise ConfigError("sft.pad_to_multiple_of", f"must be >= 1, got {s.pad_to_multiple_of}")
    Template(s.prompt_template, s.answer_template).check("sft.prompt_template", "sft.answer_template")
    view = load_view(cfg, dataset_dirs(cfg))
    _check_tokenizers(cfg, view)
    n = len(view)
    if n == 0:
        raise ConfigError("data.paths", f"no example fits model.seq_length={cfg.model.seq_length} "
                                        f"({view.dropped} dropped)")
    p = cfg.parallel
    check_layout(cfg, round_up(int(view.length.max()) - 1, row_multiple(p, s.pad_to_multiple_of)), "example")
    return epoch_iters(cfg, n)


def data_identity(cfg: RootConfig) -> dict:
    """What defines an SFT run's data and batch (a resume may not change it): the datasets' content, the overlength
    policy and order, the global batch, sequence length and seed."""
    return {"data.paths": dataset_identity(read_manifest(d) for d in dataset_dirs(cfg)),
            "sft.overlength": cfg.sft.overlength, "sft.shuffle": cfg.sft.shuffle, **batch_identity(cfg)}


# ---------------------------------------------------------------------------------------------------------- stage


class SFTStage(Stage):
    def __init__(self, cfg: RootConfig, plan, rt):
        from megatron.core import parallel_state

        p = cfg.parallel
        self.cfg, self.plan = cfg, plan
        self.view = load_view(cfg, dataset_dirs(cfg))
        self.tokenizer = _check_tokenizers(cfg, self.view)
        tok = self.view.sets[0].manifest["tokenizer"]
        if tok["size"] > cfg.model.vocab_size:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                                  f"{tok['size']} tokens")
        self.pad_id = int(tok["eos"])  # any id: padded positions carry no loss and are never attended to
        self.n = len(self.view)
        self.gbs, self.mbs, self.dp, self.dp_rank = p.global_batch_size, p.micro_batch_size, plan.dp, \
            parallel_state.get_data_parallel_rank()
        self.multiple = row_multiple(p, cfg.sft.pad_to_multiple_of)
        self.same_length = p.pp > 1
        self.packing, self.budget = cfg.train.packing, p.max_tokens_per_microbatch
        self.capacity = self.budget or cfg.model.seq_length  # tokens of a packed row
        self.epochs_used = -(-plan.iters * self.gbs // self.n)
        self.order = EpochOrder(self.n, self.gbs, cfg.train.seed, cfg.sft.shuffle)
        self._last = None  # (iteration, per dp rank: (microbatch groups, lengths))
        self.answer_total = 0

    def examples(self, iteration: int) -> np.ndarray:
        """Indices (into the view) of the global batch of ``iteration``, in position order."""
        return self.order.batch(iteration)

    def _layout(self, iteration: int) -> list[tuple[list[np.ndarray], list[int]]]:
        """Per data-parallel rank: its microbatches (example indices) and their lengths (padded length, or a packed
        row's). A rank takes its contiguous slice of the global batch whatever the layout; the step's metrics reuse
        what its microbatches computed."""
        if self._last is None or self._last[0] != iteration:
            ex = self.examples(iteration)
            per = self.gbs // self.dp
            self._last = (iteration, [self._lay(ex[r * per:(r + 1) * per]) for r in range(self.dp)])
        return self._last[1]

    def _lay(self, mine: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        tokens = self.view.length[mine] - 1  # an example's inputs: ids[:-1]
        if self.packing:
            idx = best_fit(tokens, self.capacity)
        elif self.budget:
            idx = by_token_budget(tokens, self.budget, self.multiple)
        else:
            idx = by_count(len(mine), self.mbs)
        groups = [mine[g] for g in idx]
        lengths = [int(tokens[g].sum() if self.packing else tokens[g].max()) for g in idx]
        if self.same_length:  # pipeline stages exchange one activation shape per step
            lengths = [max(lengths)] * len(lengths)
        return groups, [round_up(n, self.multiple) for n in lengths]

    # --- Stage API
    def microbatches(self, iteration: int):
        groups, lengths = self._layout(iteration)[self.dp_rank]
        lay = collate_packed if self.packing else collate
        return [lay([(self.view.ids(int(i)), int(self.view.prompt_len[i])) for i in g], n, self.pad_id)
                for g, n in zip(groups, lengths)]

    def rows_per_microbatch(self, micro_batch_size: int) -> int:
        return 1 if self.packing else micro_batch_size

    def restore(self, start: int, state: dict) -> None:
        self.answer_total = int(state.get("answer_tokens", 0)) if start else 0

    def describe(self) -> str:
        v = self.view
        return (f"{self.n:,} examples ({v.truncated:,} truncated, {v.dropped:,} dropped at seq_length+1="
                f"{self.cfg.model.seq_length + 1}) x {self.plan.iters * self.gbs / self.n:.2f} epochs, "
                f"{int(v.answer_len.sum()):,} answer tokens per epoch")

    def lineage(self) -> dict:
        d = self.cfg.data
        dirs = [str(s.path) for s in self.view.sets]
        return {"data": d.hf_dataset or (dirs[0] if len(dirs) == 1 else dirs), "examples": self.n,
                "samples": self.plan.iters * self.gbs, "epochs": self.plan.iters * self.gbs / self.n,
                "template": self.view.sets[0].manifest.get("template")}

    def metrics(self, iteration, step_s, peak_flops, world_size):
        result = self.result
        laid = [(g, n) for groups, lengths in self._layout(iteration) for g, n in zip(groups, lengths)]
        real = int(sum(self.view.length[g].sum() - len(g) for g, _ in laid))
        padded = int(sum(n * (1 if self.packing else len(g)) for g, n in laid))
        self.answer_total += result.tokens
        return {"answer_tokens": result.tokens, "answer_tokens_total": self.answer_total,
                "examples_per_s": self.gbs / step_s, "tokens_per_s": real / step_s,
                "padding_fraction": 1.0 - real / max(padded, 1),
                "epoch": (iteration + 1) * self.gbs / self.n}

    def postfix(self, record):
        return {**super().postfix(record), "ex_s": f"{record['examples_per_s']:,.1f}", "pad": f"{record['padding_fraction']:.2f}"}

    def checkpoint_extra(self, step):
        return {"consumed_samples": step * self.gbs, "answer_tokens": self.answer_total}


def build(cfg: RootConfig, plan, rt) -> SFTStage:
    return SFTStage(cfg, plan, rt)


def synthetic_size(cfg: RootConfig) -> int:
    """Examples in the generated SFT set (``data.source=synthetic``)."""
    return cfg.sft.synthetic_examples
