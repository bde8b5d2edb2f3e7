"""The seam between the one loop (``train.loop.fit``) and a stage: the ``Stage`` base class, whose defaults are the
language-model objective trained as one role, and the data order / iteration count of the fine-tuning stages."""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.data.packing import packed_seq_params
from evolm_nemo.losses import masked_token_sum
from evolm_nemo.stages import check_budget_keys
from evolm_nemo.train.engine import StepResult, build_training_model, train_step
from evolm_nemo.train.loop import Role, Start


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """megatron's 3-tuple loss contract: (loss sum, token count, logs to reduce)."""
    total, count = masked_token_sum(output_tensor, loss_mask)
    return total, count, {"loss_sum": total.detach().clone(), "tokens": count.detach().clone()}


def lm_forward_step(data_iterator, model):
    """Next-token objective: megatron's GPTModel returns per-token cross-entropy when given labels. Microbatches are
    right-padded, so under the causal mask no real token ever attends to padding; a packed row carries its
    sequence bounds (``data.packing``), and attention stays within each sequence."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                   packed_seq_params=packed_seq_params(batch))
    return output, partial(lm_loss, batch["loss_mask"])


def check_layout(cfg, longest: int, unit: str) -> None:
    """``train.packing`` / ``parallel.max_tokens_per_microbatch`` settings that cannot run, in one line each;
    ``longest``: the tokens the largest ``unit`` of the data takes in a microbatch (padded, or packed)."""
    budget, m = cfg.parallel.max_tokens_per_microbatch, cfg.model
    if budget is not None and budget < longest:
        raise ConfigError("parallel.max_tokens_per_microbatch", f"{budget} tokens do not hold the longest {unit} "
                                                                f"({longest} tokens in a microbatch); raise it")
    if budget is not None and not cfg.train.packing and cfg.parallel.pp > 1:
        raise ConfigError("parallel.max_tokens_per_microbatch", "with parallel.pp > 1 pipeline stages exchange one "
                                                                "activation shape; use it with train.packing=true")
    if cfg.train.packing and m.core_attention == "megatron" and m.layer_spec != "te":
        raise ConfigError("train.packing", "model.core_attention=megatron has no packed-sequence path; use "
                                           "model.core_attention=sdpa (the default) or the te layer spec")


class EpochOrder:
    """The data order of the fine-tuning stages: global sample ``g = iteration * global_batch + position`` is
    position ``g % n`` of epoch ``g // n``'s permutation (seeded by ``seed`` and the epoch; ``shuffle=False`` keeps
    the dataset order). A pure function of the iteration, so a resumed run sees what the uninterrupted one saw."""

    def __init__(self, n: int, global_batch: int, seed: int, shuffle: bool = True):
        self.n, self.gbs, self.seed, self.shuffle = n, global_batch, seed, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                                  else np.arange(self.n))
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
        return self._perms[epoch]

    def batch(self, iteration: int) -> np.ndarray:
        """Indices (0..n-1) of the global batch of ``iteration``, in position order."""
        g = np.arange(iteration * self.gbs, (iteration + 1) * self.gbs)
        return np.array([self.perm(int(x // self.n))[x % self.n] for x in g], dtype=np.int64)


def epoch_iters(cfg, n: int, what: str = "examples") -> int:
    """Iterations of a fine-tuning stage over ``n`` units: ``train.epochs`` passes (floor) and/or ``train.iters``
    (the smaller wins)."""
    check_budget_keys(cfg)
    t, gbs = cfg.train, cfg.parallel.global_batch_size
    iters = None
    if t.epochs is not None:
        iters = n * t.epochs // gbs
        if iters == 0:
            raise ConfigError("parallel.global_batch_size", f"{gbs} is more than the {n} {what} x {t.epochs} "
                                                            "epochs; lower it or raise train.epochs")
    if t.iters is not None:
        iters = t.iters if iters is None else min(iters, t.iters)
    return iters


# --- what defines a run's data and batch (``data_identity(cfg)`` of a stage module; ``train.loop.resume_check``)

FINGERPRINT_WHOLE = 64 << 20  # files up to this size are hashed whole; larger ones by FINGERPRINT_BLOCKS samples
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 16, 1 << 20


def fingerprint(*parts) -> str:
    """``sha256:<hex>`` of ``parts`` (strings, numbers, bytes): a content fingerprint in a data identity."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def file_fingerprint(path) -> str:
    """A cheap content fingerprint of one file: its size and the sha256 of its bytes -- all of them up to
    FINGERPRINT_WHOLE, else FINGERPRINT_BLOCKS evenly spaced blocks (a re-prepared corpus differs in size or in
    them; an unchanged one costs 16 MiB of reads, not a pass over it)."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FINGERPRINT_WHOLE:
            while block := f.read(1 << 24):
                h.update(block)
        else:
            for start in np.linspace(0, size - FINGERPRINT_BLOCK, FINGERPRINT_BLOCKS).astype(np.int64):
                f.seek(int(start))
                h.update(f.read(FINGERPRINT_BLOCK))
    return fingerprint(size, h.hexdigest())


def batch_identity(cfg) -> dict:
    """What defines the global batch of a stage that trains on sequences: its size, the sequence length and the
    seed of the data order."""
    return {"parallel.global_batch_size": cfg.parallel.global_batch_size, "model.seq_length": cfg.model.seq_length,
            "train.seed": cfg.train.seed}


def dataset_identity(manifests) -> list[str]:
    """Prepared datasets (`evolm prepare-sft` / `prepare-rm` directories) by the content hash their manifests record
    (the files are checked against it: ``data.sft.SFTDataset.check``)."""
    return [fingerprint(m.get("content_sha256") or json.dumps(m, sort_keys=True)) for m in manifests]


class Stage:
    """What a stage supplies to ``train.loop.fit``. Subclasses set ``cfg``, ``plan``, ``tokenizer`` and implement
    ``microbatches``; the defaults are the language-model objective on one role (``build``), one engine step per
    iteration (``step``), started from ``train.init_from`` when it is set (``start``)."""

    tokenizer: str = ""  # tokenizer reference (dir or hub name) recorded in checkpoints
    model_builder = None  # callable(m, p, dtype, pre_process, post_process); None: the LM (model.build.build_model)
    forward_step = staticmethod(lm_forward_step)
    head: str = "lm"  # the model's output layer, recorded in checkpoints: lm | value (scalar head; exports as
    #                   LlamaForSequenceClassification)
    sum_keys: tuple[str, ...] = ()  # log keys of the loss function summed over the global batch (StepResult.sums)
    history_key: str = "loss"  # the record key a run's history (TrainResult.losses) follows
    result: StepResult | None = None  # the last step's result (for ``metrics``)

    # --- the roles and where they start
    def build(self, rt) -> list[Role]:
        """The trained models (``roles[0]`` first), after the run directory is locked. Default: the stage's model
        (``model_builder``) with the megatron optimizer and a scheduler over ``plan.iters``."""
        self.rt = rt
        model, optimizer, make_scheduler = build_training_model(self.cfg, rt, self.model_builder)
        self.roles = [Role(model, optimizer, make_scheduler(self.plan.iters), make_scheduler)]
        return self.roles

    def check_parent(self) -> None:
        """Collective. A run that resumes nothing, before its run directory exists: the files of ``train.init_from``
        match their checksums (its load does not read them again), so that a damaged parent leaves nothing behind."""
        if self.cfg.train.init_from:
            self._parent(lambda: ckpt.verify(ckpt.resolve(self.cfg.train.init_from)))

    def start(self, roles: list[Role], layout: dict) -> Start:
        """Where a run that resumes nothing starts: the weights of ``train.init_from`` (``load_init``), or scratch."""
        if not self.cfg.train.init_from:
            return Start()
        meta = self._parent(lambda: self.load_init(self.cfg.train.init_from, roles[0].model))
        roles[0].optimizer.reload_model_params()
        return Start(parent_meta=meta)

    @staticmethod
    def _parent(read):
        try:
            return read()
        except ckpt.CheckpointError as exc:  # a damaged file (the check is collective: every rank says so)
            raise ConfigError("train.init_from", f"{exc}; restore the parent checkpoint or start from another "
                                                 "one") from None

    def load_init(self, path: str, model) -> dict:
        """Weights from the parent ``train.init_from``; returns its evolm.json."""
        return ckpt.load_weights(path, [model])

    def restore(self, start: int, state: dict) -> None:
        """Counters after resuming at iteration ``start`` (``state``: the checkpoint's common state, or {})."""

    def prepare(self, model, rt, start: int, out_dir) -> None:
        """After the weights are in place (``train.init_from`` or a resumed checkpoint at ``start``), before the
        first step; collective (every rank calls it)."""

    # --- one iteration
    def rows_per_microbatch(self, micro_batch_size: int) -> int:
        """Sequences in a microbatch of ``micro_batch_size`` units (pipeline stages exchange that many rows)."""
        return micro_batch_size

    def microbatches(self, iteration: int) -> list[dict[str, torch.Tensor]]:
        """This data-parallel rank's microbatches of ``iteration`` (a pure function of it: exact resume)."""
        raise NotImplementedError

    def seq_length(self, batches) -> int:
        return max(b["tokens"].shape[1] for b in batches)

    def step(self, iteration: int) -> dict:
        """One optimizer step of ``roles[0]`` over this rank's microbatches of ``iteration``; returns the record's
        first keys (``loss`` first)."""
        role, batches = self.roles[0], self.microbatches(iteration)
        lr = role.optimizer.param_groups[0]["lr"]  # the rate this step uses
        self.result = train_step(role.model, role.optimizer, batches, self.forward_step, self.seq_length(batches),
                                 self.rows_per_microbatch(self.cfg.parallel.micro_batch_size), self.rt,
                                 sum_keys=self.sum_keys)
        role.scheduler.step(increment=1)
        return {"loss": self.result.loss, "lr": lr, "grad_norm": self.result.grad_norm}

    # --- what is said and recorded
    @property
    def finite_keys(self) -> tuple[str, ...]:
        """Record keys whose non-finite value stops the run before it saves (a grad norm is measured only when
        gradients are clipped: megatron's fp32 optimizer reports none with optim.clip_grad=0)."""
        return ("loss", "grad_norm") if self.cfg.optim.clip_grad > 0 else ("loss",)

    def describe(self) -> str:
        return ""

    def lineage(self) -> dict:
        return {}

    def metrics(self, iteration: int, step_s: float, peak_flops: float | None, world_size: int) -> dict:
        """Record keys of iteration ``iteration`` beyond the step's (throughput, accuracy ...); ``self.result``."""
        return {}

    def postfix(self, record: dict) -> dict:
        """The progress bar's postfix."""
        return {"loss": f"{record['loss']:.4f}"}

    def checkpoint_extra(self, step: int) -> dict:
        return {}

    def snapshots(self, step: int) -> list[tuple[str, dict]]:
        """Checkpoints of ``roles[0]`` to keep at ``step`` besides the run's own, never pruned: (directory under the
        run, evolm.json additions)."""
        return []

    def evaluate(self, model, rt, step: int, last: bool) -> dict:
        """Metrics measured on the live model after optimizer step ``step`` (validation); merged into that step's
        record, which is then always written. Called on every rank (collectives allowed)."""
        return {}
