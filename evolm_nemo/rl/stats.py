"""Statistics of an RL step over the data-parallel replicas: global moments of masked tensors, and the rollout's
record (reward, correct ratio, lengths, the engine-vs-trainer log-prob agreement, the critic's explained variance)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from evolm_nemo.losses.rl import masked_moments
from evolm_nemo.rl.rollout import Rollout


EV_TOLERANCE = 1e-8  # return variance below which the critic's explained variance is not reported


def dp_allreduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over the data-parallel replicas (tensor-parallel ranks hold the same values already). On GPU the
    reduction runs on the current device (NCCL has no CPU tensors)."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        on = t.to(torch.cuda.current_device()) if torch.cuda.is_available() else t
        dist.all_reduce(on, op=op, group=parallel_state.get_data_parallel_group())
        if on is not t:
            t.copy_(on)
    return t


def on_tp_rank0(fn):
    """``fn()`` run on tensor-parallel rank 0 of this replica only, its result (or its one-line ConfigError, or the
    news that it failed otherwise: the other ranks raise too instead of waiting forever) handed to every rank of the
    tensor-parallel group: reward checks under wall-clock limits (the answer checker's slow path, a
    user reward function) could otherwise answer differently on two ranks of one model, whose updates must agree."""
    from megatron.core import parallel_state

    from evolm_nemo.config.errors import ConfigError

    if not dist.is_initialized() or parallel_state.get_tensor_model_parallel_world_size() == 1:
        return fn()
    box, failure = [None], None
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ConfigError as exc:
            box[0] = ("error", (exc.key, exc.message))
        except Exception as exc:  # noqa: BLE001 - any failure is handed on: the other ranks must not wait forever
            failure = exc
            box[0] = ("crash", f"{type(exc).__name__}: {exc}")
    dist.broadcast_object_list(box, src=parallel_state.get_tensor_model_parallel_src_rank(),
                               group=parallel_state.get_tensor_model_parallel_group())
    status, value = box[0]
    if status == "error":
        raise ConfigError(*value)
    if status == "crash":
        if failure is not None:
            raise failure
        raise RuntimeError(f"tensor-parallel rank 0 failed while computing rewards: {value}")
    return value


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """Mean and variance of ``x`` where ``mask`` is 1, over every data-parallel replica."""
    s, sq, n = masked_moments(x, mask)
    t = dp_allreduce(torch.stack([s, sq, n]).double())
    mean = float(t[0] / t[2].clamp(min=1))
    return mean, max(float(t[1] / t[2].clamp(min=1)) - mean * mean, 0.0)


def rollout_metrics(ro: Rollout, old_logp: list, batches: list[dict], values, rollout_s: float) -> dict:
    """The rollout's part of an RL step's record, over the global batch (every data-parallel replica)."""
    lengths = torch.tensor(ro.response_lengths, dtype=torch.float64)
    n = torch.tensor(float(len(ro)), dtype=torch.float64)
    # the engine's log p vs the trainer's recomputed one, over tokens the engine reported
    diffs = [abs(a - b) for e, o in zip(ro.engine_logp, old_logp) for a, b in zip(e, o) if not math.isnan(a)]
    ratios = [math.exp(b - a) for e, o in zip(ro.engine_logp, old_logp) for a, b in zip(e, o) if not math.isnan(a)]
    local = torch.tensor([sum(ro.rewards), float(lengths.sum()), float(sum(ro.truncated)), n, sum(diffs),
                          float(len(diffs)), sum(ratios), sum(ro.correct), sum(ro.rm_scores or [0.0])],
                         dtype=torch.float64)
    g = dp_allreduce(local.clone())
    mx = dp_allreduce(torch.tensor([float(lengths.max()), max(diffs, default=0.0)], dtype=torch.float64),
                      dist.ReduceOp.MAX)
    rec = {"reward_mean": float(g[0] / g[3]), "correct_ratio": float(g[7] / g[3]),
           "response_length_mean": float(g[1] / g[3]), "response_length_max": int(mx[0]),
           "truncated_fraction": float(g[2] / g[3]), "logp_mismatch_mean": float(g[4] / max(g[5], 1)),
           "logp_mismatch_max": float(mx[1]), "prob_ratio_mean": float(g[6] / max(g[5], 1)),
           "rollout_tokens_per_s": float(g[1]) / max(rollout_s, 1e-9)}  # response tokens, all dp replicas
    if ro.rm_scores is not None:
        rec["rm_score_mean"] = float(g[8] / g[3])
    if values is not None:  # explained variance of the critic's values for the returns, over the global batch
        mask = torch.cat([b["loss_mask"].flatten() for b in batches])
        ret = torch.cat([b["returns"].flatten() for b in batches])
        val = torch.cat([b["old_values"].flatten() for b in batches])
        _, var_r = global_moments(ret, mask)
        _, var_e = global_moments(ret - val, mask)
        # undefined when the returns do not vary (e.g. every reward 0: float32 GAE leaves returns ~1e-7)
        rec["explained_variance"] = 1.0 - var_e / var_r if var_r > EV_TOLERANCE else float("nan")
        rec["value_mean"] = global_moments(val, mask)[0]
    return rec
