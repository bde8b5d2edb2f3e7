"""Reward-model and preference losses as pure functions of scores / log-probs (tested without megatron).

Every function returns per-example (or per-pair) values; the stage sums them and the engine divides by the number of
examples (pairs) in the whole global batch, so the loss is a mean over the global batch however it is split.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

PREFERENCE_LOSSES = ("sigmoid", "ipo")  # DPO (Rafailov et al. 2023) | IPO (Azar et al. 2023)


def outcome_bce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Outcome RM: binary cross-entropy of ``sigmoid(score)`` against the 0/1 correctness label, per example."""
    return F.binary_cross_entropy_with_logits(scores.float(), labels.float(), reduction="none")


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Pairwise RM: ``-log sigmoid(r_chosen - r_rejected - margin)`` per pair (Llama-2's margin variant when
    ``margin > 0``)."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where the chosen response scores strictly higher, 0.5 on a tie, else 0 (per pair)."""
    diff = chosen.float() - rejected.float()
    return (diff > 0).float() + 0.5 * (diff == 0).float()


def outcome_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """1 where ``score > 0`` agrees with the label (per example)."""
    return ((scores.float() > 0) == labels.bool()).float()


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
                    label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO / IPO per pair from the responses' log-probs under the policy and the frozen reference.

    ``h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r))``.
    sigmoid (DPO, with conservative label smoothing eps): ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    ipo: ``(h - 1/(2 beta))^2``; callers pass length-normalised (per-token mean) log-probs, as IPO is defined.
    Returns ``(loss, chosen_reward, rejected_reward)`` per pair, the implicit rewards ``beta (log pi - log ref)``."""
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(f"loss_type must be one of {PREFERENCE_LOSSES}, got {loss_type!r}")
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        loss = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def roc_auc(scores, labels) -> float | None:
    """Area under the ROC curve: the probability that a random positive outscores a random negative (ties count
    half), via ranks (Mann-Whitney U). None when one class is absent: undefined (null in metrics.jsonl, not NaN)."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    y = torch.as_tensor(labels).flatten().bool()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = torch.argsort(s)
    ranks = torch.empty_like(s)
    sorted_s = s[order]
    i, n = 0, len(s)
    while i < n:  # average ranks over ties
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = float(ranks[y].sum()) - pos * (pos + 1) / 2.0
    return u / (pos * neg)


def roles_auc(scores: dict[int, float], pairs: np.ndarray) -> float | None:
    """Pairwise ``val_auc``: the probability that a response chosen in some pair outscores another response rejected
    in some pair (ties half). With chained preferences (a>b, b>c) a response is in both groups -- its stored label
    says only which it was first -- and is never compared with itself; None when no two responses compare."""
    chosen, rejected = np.unique(pairs[:, 0]), np.unique(pairs[:, 1])
    auc = roc_auc([scores[int(q)] for q in chosen] + [scores[int(q)] for q in rejected],
                  [1] * len(chosen) + [0] * len(rejected))
    both = len(np.intersect1d(chosen, rejected))  # self-comparisons: each a tie counted half by roc_auc
    n = len(chosen) * len(rejected) - both
    return None if auc is None or n == 0 else (auc * len(chosen) * len(rejected) - 0.5 * both) / n
