"""An RL step's statistics (rl.stats) without a model: the critic's explained variance is undefined, not huge, when
the returns do not vary (every reward 0 leaves float32 GAE returns of ~1e-7)."""

from __future__ import annotations

import math

import torch

from evolm_nemo.rl.rollout import Rollout
from evolm_nemo.rl.stats import rollout_metrics


def _rollout(n: int) -> Rollout:
    ro = Rollout([[1, 2]] * n, [[3, 4, 5]] * n, [[-0.5, -0.5, math.nan]] * n, ["x"] * n, [False] * n, ["1"] * n)
    ro.rewards, ro.correct = [0.0] * n, [0.0] * n
    return ro


def _batches(returns: torch.Tensor, values: torch.Tensor) -> list[dict]:
    return [{"loss_mask": torch.ones_like(returns), "returns": returns, "old_values": values}]


def test_explained_variance_is_nan_when_returns_do_not_vary():
    n = 4
    old_logp = [[-0.5, -0.5, -0.1]] * n
    flat = torch.full((n, 3), 1e-7) + torch.randn(n, 3) * 1e-9  # all rewards 0: returns ~1e-7 of float32 noise
    rec = rollout_metrics(_rollout(n), old_logp, _batches(flat, torch.randn(n, 3)), values=True, rollout_s=1.0)
    assert math.isnan(rec["explained_variance"])
    returns = torch.randn(n, 3)
    rec = rollout_metrics(_rollout(n), old_logp, _batches(returns, returns * 0.5), values=True, rollout_s=1.0)
    assert 0.0 < rec["explained_variance"] <= 1.0  # the critic explains part of a varying return
