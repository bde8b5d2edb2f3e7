"""Reward models (``stage=rm``): our GPT with the scalar value head (``model.heads``), its backbone from
``train.init_from`` (an SFT checkpoint; the head starts fresh), trained on `evolm prepare-rm` datasets.

Objectives (``rm.objective``): ``outcome`` -- binary cross-entropy of the score read at each sequence's last
response token against its correct/incorrect label; ``pairwise`` -- Bradley-Terry ``-log sigmoid(r_c - r_r - m)``
over (chosen, rejected) pairs. A training unit is an example (outcome) or a pair (pairwise); the loss is the mean over
the units of the whole global batch (each microbatch returns its sum and its unit count, megatron divides once), so
the split into microbatches and data-parallel ranks changes neither loss nor gradients.

Validation: ``rm.val_fraction`` of the problems (never their responses in training) are held out; every
``rm.val_interval`` iterations and at the end their scores give ``val_loss``, ``val_accuracy`` and ``val_auc``
(outcome: correct vs incorrect; pairwise: chosen vs rejected, ``val_accuracy`` being the pair accuracy); the final
scores of every validation sequence go to ``<run>/rm_val_scores.jsonl``.

Data order is ``EpochOrder`` over the training units, as in SFT (exact resume).
"""

from __future__ import annotations

import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.collate import collate_sequences
from evolm_nemo.data.packing import (best_fit, by_count, by_token_budget, collate_packed_sequences,
                                     packed_seq_params, round_up, row_multiple)
from evolm_nemo.data.rm import FORMAT, RMDataset
from evolm_nemo.data.sft import read_manifest, tokenizer_fingerprint
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.fileio import write_jsonl
from evolm_nemo.losses.preference import (bradley_terry, outcome_accuracy, outcome_bce, pair_accuracy, roc_auc,
                                          roles_auc)
from evolm_nemo.model.heads import build_value_model, load_backbone, scores_at_last
from evolm_nemo.stages import check_budget_keys
from evolm_nemo.stages.base import (EpochOrder, Stage, batch_identity, check_layout,
                                   dataset_identity, epoch_iters)
from evolm_nemo.train.forward import forward_collect, value_forward_step

OBJECTIVES = ("outcome", "pairwise")
VAL_SCORES = "rm_val_scores.jsonl"  # written into the run directory by the final validation


# ------------------------------------------------------------------------------------------------- data and plan


def dataset_dirs(cfg: RootConfig) -> list[str]:
    d = cfg.data
    if d.source != "indexed":
        raise ConfigError("data.source", f"stage={cfg.stage} reads `evolm prepare-rm` datasets: data.source=indexed "
                                         "data.paths=[dir]")
    if not d.paths:
        raise ConfigError("data.paths", f"stage={cfg.stage} needs dataset directories from `evolm prepare-rm` "
                                        "(data.paths=[dir])")
    if d.weights is not None:
        raise ConfigError("data.weights", "RM datasets are concatenated, not mixed by weight; set data.weights=null")
    for path in d.paths:
        if not Path(path).is_dir():
            raise ConfigError("data.paths", f"no dataset directory {path}; run `evolm prepare-rm` first")
    return list(d.paths)


def datasets_identity(cfg: RootConfig) -> dict:
    """The RM / DPO datasets by content, and the batch (``data_identity``)."""
    return {"data.paths": dataset_identity(read_manifest(d, fmt=FORMAT, maker="evolm prepare-rm")
                                           for d in dataset_dirs(cfg)), **batch_identity(cfg)}


def data_identity(cfg: RootConfig) -> dict:
    """What defines an RM run's data and batch (a resume may not change it)."""
    r = cfg.rm
    return {**datasets_identity(cfg), "rm.objective": r.objective, "rm.val_fraction": r.val_fraction,
            "rm.shuffle": r.shuffle}


class RMData:
    """The sequences of one or more RM datasets, concatenated (global sequence ids), with the training and
    validation units: examples (``units[i] = (seq,)``) or pairs (``units[i] = (chosen, rejected)``)."""

    def __init__(self, cfg: RootConfig, pairs: bool, val_fraction: float):
        self.sets = [RMDataset(d, vocab_size=cfg.model.vocab_size, cache_dir=cfg.data.cache_dir)
                     for d in dataset_dirs(cfg)]
        first = self.sets[0].manifest["tokenizer"]
        for ds in self.sets[1:]:
            if ds.manifest["tokenizer"]["vocab_sha256"] != first["vocab_sha256"]:
                raise ConfigError("data.paths", f"{ds.path} and {self.sets[0].path} were tokenized with different "
                                                "tokenizers; prepare them with the same one")
        self.tokenizer_info = first
        offsets = np.cumsum([0] + [len(ds) for ds in self.sets])
        self.seq_set = np.concatenate([np.full(len(ds), k) for k, ds in enumerate(self.sets)])
        self.seq_local = np.concatenate([np.arange(len(ds)) for ds in self.sets])
        self.length = np.concatenate([ds.length for ds in self.sets])
        self.prompt_len = np.concatenate([ds.prompt_len for ds in self.sets])
        self.labels = np.concatenate([ds.labels for ds in self.sets]).astype(np.float32)
        self.groups = self._problems()
        if pairs:
            units = [ds.pairs + offsets[k] for k, ds in enumerate(self.sets)]
            units = np.concatenate(units) if units else np.zeros((0, 2), np.int64)
            if len(units) == 0:
                raise ConfigError("data.paths", "these datasets hold no pairs; prepare them with "
                                                "`evolm prepare-rm kind=pairs`")
        else:
            units = np.arange(len(self.labels)).reshape(-1, 1)
        n_groups = int(self.groups.max()) + 1 if len(self.groups) else 0
        rng = np.random.default_rng([cfg.train.seed, 7])
        n_val = math.ceil(val_fraction * n_groups) if val_fraction > 0 else 0
        is_val = np.isin(self.groups[units[:, 0]], rng.permutation(n_groups)[:n_val])
        self.train_units, self.val_units = units[~is_val], units[is_val]

    def _problems(self) -> np.ndarray:
        """The problem of every sequence, one number per distinct prompt over all the datasets: the first dataset's
        own ``groups``, and a problem of a later one the number of the same prompt before it (two sampling rounds of
        one prompt set), else a new number -- so that a held-out problem is held out of every dataset."""
        numbers: dict[bytes, int] = {}
        top, out = 0, []
        for k, ds in enumerate(self.sets):
            local, first = np.unique(ds.groups, return_index=True)  # each problem's first sequence: its prompt
            ours = []
            for g, i in zip(local.tolist(), first.tolist()):
                number = numbers.setdefault(ds.ids(i)[:int(ds.prompt_len[i])].tobytes(), g if k == 0 else top)
                top = max(top, number + 1)
                ours.append(number)
            out.append(np.asarray(ours, dtype=np.int64)[np.searchsorted(local, ds.groups)])
        return np.concatenate(out)

    def ids(self, seq: int) -> np.ndarray:
        return self.sets[self.seq_set[seq]].ids(int(self.seq_local[seq]))


def check_tokenizer(cfg: RootConfig, data: RMData) -> str:
    """The datasets' tokenizer is the parent's; returns the reference the run records."""
    ref = data.tokenizer_info["ref"]
    parent = ckpt.parent_tokenizer(cfg.train.init_from, key="train.init_from")
    for key, other in (("train.init_from", parent), ("data.tokenizer", cfg.data.tokenizer)):
        if other and tokenizer_fingerprint(load_tokenizer(other, key=key))["vocab_sha256"] != \
                data.tokenizer_info["vocab_sha256"]:
            raise ConfigError("data.paths", f"{data.sets[0].path} was tokenized with {ref}, but {key} uses {other}; "
                                            f"run `evolm prepare-rm tokenizer={other}` again")
    if data.tokenizer_info["size"] > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"{data.tokenizer_info['size']} tokens")
    return parent or ref


def fit_units(cfg: RootConfig, data: RMData) -> tuple[np.ndarray, np.ndarray, int]:
    """Units whose sequences all fit ``model.seq_length`` (longer ones are dropped and counted)."""
    ok = lambda units: np.all(data.length[units] <= cfg.model.seq_length, axis=1)  # noqa: E731
    train, val = data.train_units[ok(data.train_units)], data.val_units[ok(data.val_units)]
    dropped = len(data.train_units) + len(data.val_units) - len(train) - len(val)
    return train, val, dropped


def plan_iters(cfg: RootConfig, dp: int) -> int:
    r = cfg.rm
    if r.objective not in OBJECTIVES:
        raise ConfigError("rm.objective", f"must be one of {', '.join(OBJECTIVES)}; got {r.objective!r}")
    if not 0.0 <= r.val_fraction < 1.0:
        raise ConfigError("rm.val_fraction", f"must be in [0, 1), got {r.val_fraction}")
    if r.val_interval < 0:
        raise ConfigError("rm.val_interval", f"must be >= 0, got {r.val_interval}")
    if not r.margin >= 0:  # (not ``< 0``: NaN fails every comparison)
        raise ConfigError("rm.margin", f"must be >= 0: the chosen score must beat the rejected one by this much "
                                       f"(-log sigmoid(r_chosen - r_rejected - margin)); a negative margin lets it "
                                       f"lose, got {r.margin}")
    if r.margin and r.objective == "outcome":  # it would be silently ignored: BCE has no margin
        raise ConfigError("rm.margin", "applies to rm.objective=pairwise only (the Bradley-Terry margin); "
                                       "rm.objective=outcome is binary cross-entropy: leave rm.margin 0")
    if r.pad_to_multiple_of < 1:
        raise ConfigError("rm.pad_to_multiple_of", f"must be >= 1, got {r.pad_to_multiple_of}")
    if r.val_fraction > 0 and cfg.parallel.pp > 1:
        raise ConfigError("rm.val_fraction", "validation runs with parallel.pp=1; set rm.val_fraction=0 for pp > 1")
    check_budget_keys(cfg)
    data = RMData(cfg, r.objective == "pairwise", r.val_fraction)
    check_tokenizer(cfg, data)
    if len(data.train_units) == 0:
        raise ConfigError("rm.val_fraction", f"{r.val_fraction} holds out every problem of data.paths for "
                                             "validation; lower it (or add problems)")
    train, _, _ = fit_units(cfg, data)
    if len(train) == 0:
        raise ConfigError("data.paths", f"no training {'pair' if r.objective == 'pairwise' else 'example'} fits "
                                        f"model.seq_length={cfg.model.seq_length}")
    check_unit_layout(cfg, data, train, r.pad_to_multiple_of, "pair" if r.objective == "pairwise" else "example")
    return epoch_iters(cfg, len(train), "pairs" if r.objective == "pairwise" else "examples")


# ---------------------------------------------------------------------------------------------- batches and loss


def check_unit_layout(cfg: RootConfig, data: RMData, units: np.ndarray, pad_multiple: int, unit: str) -> None:
    """``check_layout`` with the tokens the largest unit takes: its sequences back to back when packed, else as many
    rows as it has sequences at the padded length of its longest."""
    p = cfg.parallel
    lengths = data.length[units]
    if cfg.train.packing:
        longest = int(lengths.sum(1).max())
    else:
        longest = units.shape[1] * round_up(int(lengths.max()), row_multiple(p, pad_multiple))
    check_layout(cfg, longest, unit)


def rm_loss(objective: str, margin: float, batch: dict, values: torch.Tensor):
    """megatron's 3-tuple: (sum of unit losses, unit count, logs). Pairwise microbatches hold the chosen sequences
    first, then the rejected ones, in the same order."""
    scores = scores_at_last(values, batch["last"])
    if objective == "outcome":
        per, right = outcome_bce(scores, batch["label"]), outcome_accuracy(scores, batch["label"])
    else:
        k = scores.shape[0] // 2
        per, right = bradley_terry(scores[:k], scores[k:], margin), pair_accuracy(scores[:k], scores[k:])
    total = per.sum()
    count = torch.tensor(per.numel(), dtype=torch.int32, device=scores.device)
    return total, count, {"loss_sum": total.detach().clone(), "tokens": count.clone(),
                          "correct": right.sum().detach(), "score_sum": scores.detach().sum()}


def rm_forward_step(objective: str, margin: float, data_iterator, model):
    batch = next(data_iterator)
    values = model(batch["tokens"], batch["position_ids"], None, packed_seq_params=packed_seq_params(batch))
    return values, partial(rm_loss, objective, margin, batch)


# ---------------------------------------------------------------------------------------------------------- stage


class UnitBatches:
    """Microbatch layout shared by the RM and DPO stages: a global batch of units (examples or pairs), dp rank r's
    contiguous slice of it, split into microbatches of ``micro_batch_size`` units, or by a token budget
    (``parallel.max_tokens_per_microbatch``), or packed into rows (``train.packing``: whole units best-fit into rows
    of ``model.seq_length`` tokens per sequence of a unit, or the budget); a pair microbatch (or row) holds its
    chosen sequences, then its rejected ones."""

    def __init__(self, cfg: RootConfig, plan, data: RMData, units: np.ndarray, shuffle: bool, pad_multiple: int):
        from megatron.core import parallel_state

        p = cfg.parallel
        self.data, self.units = data, units
        self.gbs, self.mbs, self.dp = p.global_batch_size, p.micro_batch_size, plan.dp
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.multiple = row_multiple(p, pad_multiple)
        self.same_length = p.pp > 1
        self.pad_id = int(data.tokenizer_info["eos"])
        self.order = EpochOrder(len(units), self.gbs, cfg.train.seed, shuffle)
        self.packing, self.budget = cfg.train.packing, p.max_tokens_per_microbatch
        self.per_unit = units.shape[1] if units.ndim == 2 else 1  # sequences per unit
        self.capacity = self.budget or cfg.model.seq_length * self.per_unit
        self._last = None
        self.per_sequence: dict[str, np.ndarray] = {}  # more per-sequence values collated into every microbatch

    def rows(self, micro_batch_size: int) -> int:
        """Rows of a microbatch (pipeline stages exchange that shape)."""
        return 1 if self.packing else self.per_unit * micro_batch_size

    def layout(self, iteration: int) -> list[tuple[list[np.ndarray], list[int]]]:
        """Per data-parallel rank: its microbatches (unit arrays ``[k, 1|2]``) and their lengths (padded length, or
        a packed row's)."""
        if self._last is None or self._last[0] != iteration:
            picked = self.units[self.order.batch(iteration)]
            per = self.gbs // self.dp
            self._last = (iteration, [self._lay(picked[r * per:(r + 1) * per]) for r in range(self.dp)])
        return self._last[1]

    def _lay(self, mine: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
        lengths = self.data.length[mine]  # [units, 1|2]
        if self.packing:
            idx = best_fit(lengths.sum(1), self.capacity)
        elif self.budget:
            idx = by_token_budget(lengths.max(1), self.budget, self.multiple, rows_per=self.per_unit)
        else:
            idx = by_count(len(mine), self.mbs)
        groups = [mine[g] for g in idx]
        sizes = [int(lengths[g].sum() if self.packing else lengths[g].max()) for g in idx]
        if self.same_length:
            sizes = [max(sizes)] * len(sizes)
        return groups, [round_up(n, self.multiple) for n in sizes]

    def collate(self, group: np.ndarray, length: int) -> dict:
        seqs = [int(s) for s in group.T.reshape(-1)]  # column-major: all chosen, then all rejected
        lay = collate_packed_sequences if self.packing else collate_sequences
        batch = lay([self.data.ids(s) for s in seqs], [int(self.data.prompt_len[s]) for s in seqs], length,
                    self.pad_id)
        batch["label"] = torch.as_tensor(self.data.labels[seqs], dtype=torch.float32)
        for key, values in self.per_sequence.items():
            batch[key] = torch.as_tensor(values[seqs], dtype=torch.float32)
        return batch

    def microbatches(self, iteration: int) -> list[dict]:
        groups, lengths = self.layout(iteration)[self.dp_rank]
        return [self.collate(g, n) for g, n in zip(groups, lengths)]

    def padding_fraction(self, iteration: int) -> float:
        laid = [(g, n) for groups, lengths in self.layout(iteration) for g, n in zip(groups, lengths)]
        real = sum(int(self.data.length[g].sum()) for g, _ in laid)
        padded = sum(n * (1 if self.packing else g.size) for g, n in laid)
        return 1.0 - real / max(padded, 1)


def gather_dp(values: list) -> list:
    """Concatenate per-data-parallel-rank Python lists on every rank (rank order)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized() or parallel_state.get_data_parallel_world_size() == 1:
        return list(values)
    out = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(out, list(values), group=parallel_state.get_data_parallel_group())
    return [x for part in out for x in part]


class RMStage(Stage):
    head = "value"
    def __init__(self, cfg: RootConfig, plan, rt):
        r = cfg.rm
        self.cfg, self.plan, self.rt = cfg, plan, rt
        self.pairwise = r.objective == "pairwise"
        self.data = RMData(cfg, self.pairwise, r.val_fraction)
        self.tokenizer = check_tokenizer(cfg, self.data)
        self.train_units, self.val_units, self.dropped = fit_units(cfg, self.data)
        self.batches = UnitBatches(cfg, plan, self.data, self.train_units, r.shuffle, r.pad_to_multiple_of)
        self.model_builder = build_value_model
        self.forward_step = partial(rm_forward_step, r.objective, r.margin)
        self.unit = "pairs" if self.pairwise else "examples"
        if not self.pairwise and rt.is_main:
            for what, units in (("training", self.train_units), ("validation", self.val_units)):
                line = one_class(self.data.labels[units[:, 0]], what)
                if line:
                    print(f"[evolm] warning: rm.objective=outcome: {line}", file=sys.stderr, flush=True)

    def microbatches(self, iteration):
        return self.batches.microbatches(iteration)

    def load_init(self, path, model):
        return load_backbone(path, [model])  # the backbone of an SFT (or any) checkpoint; a fresh scalar head

    def describe(self):
        n = len(self.train_units)
        pos = int(self.data.labels[self.train_units[:, 0]].sum()) if not self.pairwise else None
        balance = f" ({pos:,} correct)" if pos is not None else ""
        return (f"rm {self.cfg.rm.objective}: {n:,} training {self.unit}{balance}, {len(self.val_units):,} "
                f"validation ({self.dropped:,} over seq_length dropped) x "
                f"{self.plan.iters * self.batches.gbs / n:.2f} epochs")

    def lineage(self):
        return {"data": [str(s.path) for s in self.data.sets], "objective": self.cfg.rm.objective,
                self.unit: len(self.train_units), "epochs": self.plan.iters * self.batches.gbs /
                len(self.train_units)}

    def metrics(self, iteration, step_s, peak_flops, world_size):
        result = self.result
        return {"accuracy": result.sums.get("correct", 0.0) / max(result.tokens, 1),
                "score_mean": result.sums.get("score_sum", 0.0) / max(result.tokens * (2 if self.pairwise else 1), 1),
                f"{self.unit}_per_s": self.batches.gbs / step_s,
                "padding_fraction": self.batches.padding_fraction(iteration),
                "epoch": (iteration + 1) * self.batches.gbs / len(self.train_units)}

    def postfix(self, record):
        return {**super().postfix(record), "acc": f"{record['accuracy']:.3f}"}

    def checkpoint_extra(self, step):
        return {"consumed_samples": step * self.batches.gbs}

    sum_keys = ("correct", "score_sum")

    def rows_per_microbatch(self, micro_batch_size):
        return self.batches.rows(micro_batch_size)

    def evaluate(self, model, rt, step, last):
        interval = self.cfg.rm.val_interval
        if len(self.val_units) == 0 or not (last or (interval and step % interval == 0)):
            return {}
        scores = score_sequences(model, self.data, self.val_units.reshape(-1), self.batches, rt)
        if last and rt.is_main:  # every validation sequence's final score, for inspection and calibration
            write_jsonl(Path(self.cfg.run.out_dir) / VAL_SCORES,
                        ({"sequence": q, "dataset": str(self.data.sets[self.data.seq_set[q]].path),
                          "index": int(self.data.seq_local[q]), "problem": int(self.data.groups[q]),
                          "label": float(self.data.labels[q]), "score": v} for q, v in sorted(scores.items())))
        return validation_metrics(scores, self.data, self.val_units, self.cfg.rm.objective, self.cfg.rm.margin)


def forward_sequences(model, data: RMData, seqs: np.ndarray, forward_step, per_row, micro_batch_size: int,
                      multiple: int, pad_id: int, rt) -> list[tuple[int, float]]:
    """``(sequence id, value)`` for every one of ``seqs`` (global sequence ids; duplicates once) from a forward-only
    pass of the live model (pp = 1): each data-parallel rank takes its share, sorted by length so that microbatches
    carry little padding; ``per_row(output, batch) -> [b]`` reduces a microbatch's output; gathered on every rank."""
    from megatron.core import parallel_state

    seqs = np.unique(seqs)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = seqs[rank::dp]
    mine = mine[np.argsort(-data.length[mine], kind="stable")]
    batches, chunks = [], []
    for i in range(0, len(mine), micro_batch_size):
        chunk = mine[i:i + micro_batch_size]
        length = round_up(int(data.length[chunk].max()), multiple)
        batches.append(collate_sequences([data.ids(int(q)) for q in chunk],
                                         [int(data.prompt_len[q]) for q in chunk], length, pad_id))
        chunks.append(chunk)
    was_training = model.training
    model.eval()
    try:
        outs = forward_collect(model, batches, forward_step, micro_batch_size, rt) if batches else []
    finally:
        model.train(was_training)
    local = []
    for chunk, batch, out in zip(chunks, batches, outs):
        local += [(int(q), float(v)) for q, v in zip(chunk, per_row(out, batch).double())]
    return gather_dp(local)


def score_sequences(model, data: RMData, seqs: np.ndarray, batches: UnitBatches, rt) -> dict[int, float]:
    """Scores of ``seqs`` under the live value model (at each sequence's last token), in ``batches``' microbatch
    size, padding multiple and pad id."""
    return dict(forward_sequences(model, data, seqs, value_forward_step, lambda out, b: scores_at_last(out, b["last"]),
                                  batches.mbs, batches.multiple, batches.pad_id, rt))


def one_class(labels: np.ndarray, what: str) -> str | None:
    """A warning when the outcome examples ``labels`` (1 correct, 0 incorrect) are all of one class, else None."""
    if len(labels) == 0:
        return None
    correct = int((labels > 0.5).sum())
    if 0 < correct < len(labels):
        return None
    kind = "correct" if correct else "incorrect"
    if what == "training":
        return (f"all {len(labels):,} training examples are {kind} (one class): the value head learns a constant, "
                "not to tell correct from incorrect; sample problems the model gets both right and wrong")
    return (f"all {len(labels):,} validation examples are {kind} (one class): val_auc is undefined (null in "
            "metrics.jsonl); more problems or a larger rm.val_fraction give both classes")


def validation_metrics(scores: dict[int, float], data: RMData, units: np.ndarray, objective: str,
                       margin: float) -> dict:
    if objective == "outcome":
        s = torch.tensor([scores[int(u[0])] for u in units])
        y = torch.as_tensor(data.labels[units[:, 0]])
        return {"val_loss": float(outcome_bce(s, y).mean()), "val_accuracy": float(outcome_accuracy(s, y).mean()),
                "val_auc": roc_auc(s, y), "val_examples": len(units)}
    c = torch.tensor([scores[int(u[0])] for u in units])
    r = torch.tensor([scores[int(u[1])] for u in units])
    return {"val_loss": float(bradley_terry(c, r, margin).mean()),
            "val_accuracy": float(pair_accuracy(c, r).mean()), "val_auc": roles_auc(scores, units),
            "val_pairs": len(units)}


def build(cfg: RootConfig, plan, rt) -> RMStage:
    return RMStage(cfg, plan, rt)
