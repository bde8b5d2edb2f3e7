"""Direct preference optimisation (``stage=dpo``): the LM from ``train.init_from`` learns from (chosen, rejected) pairs
(`evolm prepare-rm kind=pairs`) against the frozen reference, which is ``train.init_from`` itself.

Reference log-probs are computed **once per pair**: before the first step the policy *is* the reference, so one
forward-only pass of the policy (each data-parallel rank its share, gathered) gives every sequence's summed response
log-prob; they are written to ``<run>/dpo_reference.safetensors`` (with the datasets' content hashes) and read back on
resume, so no second model is ever held in memory. A response's log-prob is the sum over its tokens under the same
masking as SFT (the positions predicting response tokens); ``dpo.loss_type=ipo`` uses the per-token mean (IPO's
length normalisation); ``dpo.sft_weight`` adds the chosen response's per-token NLL (RPO), since plain DPO may lower
the chosen log-prob while it widens the margin. The loss is the mean over the pairs of the whole global batch (sum per microbatch, pair count,
megatron divides once): invariant to the microbatch / data-parallel split.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from evolm_nemo.config.errors import ConfigError, first_line
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.data.packing import packed_seq_params, per_sequence_sum
from evolm_nemo.fileio import atomic_path
from evolm_nemo.losses.preference import PREFERENCE_LOSSES, preference_loss
from evolm_nemo.stages import check_budget_keys
from evolm_nemo.stages.base import Stage
from evolm_nemo.stages.rm import (RMData, UnitBatches, check_tokenizer, check_unit_layout, datasets_identity,
                                  epoch_iters, fit_units, forward_sequences)

REFERENCE_FILE = "dpo_reference.safetensors"
SUM_KEYS = ("margin_sum", "chosen_logp_sum", "rejected_logp_sum", "chosen_reward_sum", "rejected_reward_sum",
            "correct")


def plan_iters(cfg: RootConfig, dp: int) -> int:
    d = cfg.dpo
    if d.loss_type not in PREFERENCE_LOSSES:
        raise ConfigError("dpo.loss_type", f"must be one of {', '.join(PREFERENCE_LOSSES)}; got {d.loss_type!r}")
    if not d.beta > 0:  # (not ``<= 0``: NaN fails every comparison)
        raise ConfigError("dpo.beta", f"must be > 0, got {d.beta}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError("dpo.label_smoothing", f"must be in [0, 0.5), got {d.label_smoothing}")
    if d.label_smoothing and d.loss_type != "sigmoid":
        raise ConfigError("dpo.label_smoothing", "applies to dpo.loss_type=sigmoid only")
    if not d.sft_weight >= 0:
        raise ConfigError("dpo.sft_weight", f"must be >= 0, got {d.sft_weight}")
    if d.pad_to_multiple_of < 1:
        raise ConfigError("dpo.pad_to_multiple_of", f"must be >= 1, got {d.pad_to_multiple_of}")
    if cfg.parallel.pp > 1:
        raise ConfigError("parallel.pp", "stage=dpo computes reference log-probs with parallel.pp=1; use tp/dp")
    check_budget_keys(cfg)
    data = RMData(cfg, pairs=True, val_fraction=0.0)
    check_tokenizer(cfg, data)
    train, _, _ = fit_units(cfg, data)
    if len(train) == 0:
        raise ConfigError("data.paths", f"no pair fits model.seq_length={cfg.model.seq_length}")
    check_unit_layout(cfg, data, train, d.pad_to_multiple_of, "pair")
    return epoch_iters(cfg, len(train), "pairs")


def data_identity(cfg: RootConfig) -> dict:
    """What defines a DPO run's data and batch (a resume may not change it; the reference log-probs are the data's)."""
    return {**datasets_identity(cfg), "dpo.shuffle": cfg.dpo.shuffle}


def dpo_loss(d, batch: dict, per_token_ce: torch.Tensor):
    total_logp, count = per_sequence_sum(-per_token_ce.float(), batch["loss_mask"], batch)  # per sequence
    ref = batch["ref_logp"]
    if d.loss_type == "ipo":  # length-normalised log-probs
        policy, reference = total_logp / count.clamp(min=1), ref / count.clamp(min=1)
    else:
        policy, reference = total_logp, ref
    k = policy.shape[0] // 2
    loss, chosen_r, rejected_r = preference_loss(policy[:k], policy[k:], reference[:k], reference[k:], d.beta,
                                                   d.loss_type, d.label_smoothing)
    if d.sft_weight:  # RPO (Pang et al. 2024): plus the chosen response's per-token NLL, so its likelihood rises
        loss = loss - d.sft_weight * total_logp[:k] / count[:k].clamp(min=1)
    total = loss.sum()
    pairs = torch.tensor(k, dtype=torch.int32, device=loss.device)
    lp = total_logp.detach()
    return total, pairs, {"loss_sum": total.detach().clone(), "tokens": pairs.clone(),
                          "margin_sum": (chosen_r - rejected_r).sum(), "chosen_logp_sum": lp[:k].sum(),
                          "rejected_logp_sum": lp[k:].sum(), "chosen_reward_sum": chosen_r.sum(),
                          "rejected_reward_sum": rejected_r.sum(), "correct": (chosen_r > rejected_r).float().sum()}


def _lm_ce(batch: dict, model) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                 packed_seq_params=packed_seq_params(batch))  # per-token CE [b, s]


def dpo_forward_step(d, data_iterator, model):
    batch = next(data_iterator)
    return _lm_ce(batch, model), partial(dpo_loss, d, batch)


def _collect(output: torch.Tensor):
    return output.sum() * 0.0, torch.zeros((), dtype=torch.int32, device=output.device), {"ce": output.detach()}


def ce_forward_step(data_iterator, model):
    """Forward only: the same computation as training's (so at step 0 policy and reference agree exactly)."""
    return _lm_ce(next(data_iterator), model), _collect


class DPOStage(Stage):
    sum_keys = SUM_KEYS

    def __init__(self, cfg: RootConfig, plan, rt):
        d = cfg.dpo
        self.cfg, self.plan, self.rt = cfg, plan, rt
        self.data = RMData(cfg, pairs=True, val_fraction=0.0)
        self.tokenizer = check_tokenizer(cfg, self.data)
        self.units, _, self.dropped = fit_units(cfg, self.data)
        self.batches = UnitBatches(cfg, plan, self.data, self.units, d.shuffle, d.pad_to_multiple_of)
        self.forward_step = partial(dpo_forward_step, d)

    def rows_per_microbatch(self, micro_batch_size):
        return self.batches.rows(micro_batch_size)

    def microbatches(self, iteration):
        return self.batches.microbatches(iteration)  # with each sequence's ref_logp (prepare)

    # --- the reference, once
    def _fingerprint(self) -> str:
        return ",".join(s.manifest["content_sha256"] for s in self.data.sets)

    def prepare(self, model, rt, start: int, out_dir: Path) -> None:
        path = Path(out_dir) / REFERENCE_FILE
        if start > 0:  # summed response log-prob of every sequence (NaN: unused), collated as ref_logp
            self.batches.per_sequence["ref_logp"] = self._read(path)
            return
        reference = self._compute(model, rt)
        self.batches.per_sequence["ref_logp"] = reference
        if rt.is_main:
            from safetensors.torch import save_file

            with atomic_path(path) as tmp:
                save_file({"logp": torch.from_numpy(reference)}, str(tmp),
                          metadata={"datasets": self._fingerprint(), "init_from": str(self.cfg.train.init_from)})
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()

    def _read(self, path: Path) -> np.ndarray:
        from safetensors import safe_open

        if not path.is_file():
            raise ConfigError("run.out_dir", f"{path} is missing: the reference log-probs this DPO run computed "
                                             "at its start; start a new run (another run.out_dir)")
        try:
            with safe_open(str(path), "pt") as f:
                datasets = (f.metadata() or {}).get("datasets")
                logp = f.get_tensor("logp").numpy() if datasets == self._fingerprint() else None
        except Exception as exc:  # a truncated or foreign file (safetensors' own error type, or no "logp")
            raise ConfigError("run.out_dir", f"{path} is unreadable ({first_line(exc)}): the reference log-probs "
                                             "this DPO run computed at its start; start a new run (another "
                                             "run.out_dir)") from None
        if logp is None:
            raise ConfigError("data.paths", f"{path} was computed for other datasets than data.paths; resume "
                                            "with the original data or start a new run")
        if logp.shape != (len(self.data.labels),):  # (len() of a 0-d array raises)
            raise ConfigError("data.paths", f"{path} holds log-probs of shape {tuple(logp.shape)}, the data "
                                            f"{len(self.data.labels)} sequences")
        return logp

    def _compute(self, model, rt) -> np.ndarray:
        data = self.data
        seqs = np.unique(self.units.reshape(-1))
        values = forward_sequences(model, data, seqs, ce_forward_step,
                                   lambda ce, b: per_sequence_sum(-ce.float(), b["loss_mask"], b)[0], self.batches.mbs,
                                   self.batches.multiple, self.batches.pad_id, rt)
        reference = np.full(len(data.labels), np.nan, dtype=np.float64)
        for q, v in values:
            reference[q] = v
        if rt.is_main:
            print(f"[evolm] dpo: reference log-probs of {len(seqs):,} sequences computed once (train.init_from)",
                  flush=True)
        return reference

    # --- reporting
    def describe(self):
        return (f"dpo {self.cfg.dpo.loss_type} beta={self.cfg.dpo.beta}: {len(self.units):,} pairs "
                f"({self.dropped:,} over seq_length dropped) x {self.plan.iters * self.batches.gbs / len(self.units):.2f}"
                " epochs")

    def lineage(self):
        d = self.cfg.dpo
        return {"data": [str(s.path) for s in self.data.sets], "pairs": len(self.units), "beta": d.beta,
                "loss_type": d.loss_type, "label_smoothing": d.label_smoothing,
                "epochs": self.plan.iters * self.batches.gbs / len(self.units)}

    def metrics(self, iteration, step_s, peak_flops, world_size):
        result = self.result
        n = max(result.tokens, 1)
        s = result.sums
        return {"reward_margin": s["margin_sum"] / n, "chosen_logp": s["chosen_logp_sum"] / n,
                "rejected_logp": s["rejected_logp_sum"] / n, "chosen_reward": s["chosen_reward_sum"] / n,
                "rejected_reward": s["rejected_reward_sum"] / n, "accuracy": s["correct"] / n,
                "pairs_per_s": self.batches.gbs / step_s, "padding_fraction": self.batches.padding_fraction(iteration),
                "epoch": (iteration + 1) * self.batches.gbs / len(self.units)}

    def postfix(self, record):
        return {**super().postfix(record), "margin": f"{record['reward_margin']:.3f}", "acc": f"{record['accuracy']:.2f}"}

    def checkpoint_extra(self, step):
        return {"consumed_samples": step * self.batches.gbs}


def build(cfg: RootConfig, plan, rt) -> DPOStage:
    return DPOStage(cfg, plan, rt)
