"""RL objectives as pure tensor functions: advantages (GAE, GRPO / Dr. GRPO), whitening, the PPO clipped policy
loss (with dual clip), the clipped value loss, entropy, KL estimators, sequence-mean weights and truncated
importance sampling.

Conventions (as :mod:`evolm_nemo.losses.token`): tensors are ``[batch, seq]`` unless stated; ``mask`` is 0/1 (1 on
response tokens, 0 on prompt and padding); masked-out positions are kept out of every sum with ``torch.where`` (not a
multiplication, so a nan/inf there never leaks into a sum or a gradient); a loss returns the **sum** over the tokens
that count and their **count** (an int32 tensor) so the engine divides once by the global count; statistics are
detached **sums** (float32 tensors, so a caller can stack and all-reduce them in one call), never means.
"""

from __future__ import annotations

import torch

__all__ = [
    "gae",
    "masked_moments",
    "mean_var_from_moments",
    "whiten",
    "whiten_with",
    "group_advantages",
    "constant_groups",
    "policy_loss",
    "value_loss",
    "entropy_from_logits",
    "sampling_logits",
    "kl_estimate",
    "sequence_mean_weights",
    "truncated_importance_weights",
]

# verl clamps the log-ratio before exp so a stale token cannot overflow the ratio to inf (and a nan gradient through
# exp); e^20 ~ 5e8 is far beyond any clip range, so the clamp only ever bites on tokens the clip has already handled.
_LOG_RATIO_LIMIT = 20.0


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shapes differ: {shapes}")


def _float_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# --------------------------------------------------------------------------------------------------- advantages


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016) per row, over the positions where ``mask`` is 1.

    ``delta_t = r_t + gamma * V_next - V_t`` and ``A_t = delta_t + gamma * lam * A_next``, where "next" is the next
    masked position of the row; after the last response token ``V_next = A_next = 0`` (terminal), so values and
    rewards at padding never leak in. Positions where ``mask`` is 0 (prompt, padding) get advantage 0 and return 0
    and contribute nothing. Responses are contiguous; were there a gap, it is skipped (the next masked position is
    the successor), as in verl's multi-turn GAE. ``returns = advantages + values`` on masked positions.

    Inputs are detached; the result is float32 (float64 if an input is float64). With ``gamma = lam = 1``,
    ``A_t = sum(r_t..r_T) - V_t``."""
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"expected [batch, seq] tensors, got {tuple(rewards.shape)}")
    dtype = _float_dtype(rewards, values)
    keep = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(keep, rewards.detach().to(dtype), zero)
    v = torch.where(keep, values.detach().to(dtype), zero)
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        m = keep[:, t]
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, zero)
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    returns = torch.where(keep, advantages + v, zero)
    return advantages, returns


# ---------------------------------------------------------------------------------------------------- whitening


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sum x, sum x^2, count)`` over the masked entries, as float64 scalars: all-reduce (SUM) them across ranks and
    pass :func:`mean_var_from_moments` of the totals to :func:`whiten_with`. Detached."""
    _check_same_shape(x=x, mask=mask)
    keep = mask.bool()
    xd = torch.where(keep, x.detach().to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    return xd.sum(), (xd * xd).sum(), keep.sum().to(torch.float64)


def mean_var_from_moments(
    total: torch.Tensor, total_sq: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the (biased, ``unbiased=False``) variance from :func:`masked_moments` (0, 0 for no entries)."""
    n = count.clamp(min=1)
    mean = total / n
    var = (total_sq / n - mean * mean).clamp(min=0)
    return mean, var


def whiten_with(
    x: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor | float,
    var: torch.Tensor | float,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with given (e.g. globally all-reduced) statistics; with ``shift_mean=False``
    the mean is added back (only the scale changes, as TRL's ``masked_whiten``). Masked-out entries are 0. Same dtype
    as ``x``."""
    _check_same_shape(x=x, mask=mask)
    mean = torch.as_tensor(mean, dtype=torch.float64, device=x.device)
    var = torch.as_tensor(var, dtype=torch.float64, device=x.device)
    out = (x.to(torch.float64) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask.bool(), out, torch.zeros((), dtype=torch.float64, device=x.device)).to(x.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``x`` over its masked entries (local statistics; var with ``unbiased=False``); masked-out entries 0.
    Identical to ``whiten_with(x, mask, *mean_var_from_moments(*masked_moments(x, mask)))``."""
    mean, var = mean_var_from_moments(*masked_moments(x, mask))
    return whiten_with(x, mask, mean, var, shift_mean=shift_mean, eps=eps)


# ---------------------------------------------------------------------------------------------------------- GRPO


def _groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [num_prompts * n], got {tuple(rewards.shape)}")
    if n < 1 or rewards.numel() % n:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of n={n}")
    return rewards.detach().view(-1, n)


def constant_groups(rewards: torch.Tensor, n: int) -> torch.Tensor:
    """``[num_prompts]`` bool: True where all ``n`` rewards of the group (consecutive blocks of ``n``) are equal, the
    groups DAPO's dynamic sampling drops (they carry no GRPO signal)."""
    g = _groups(rewards, n)
    return (g == g[:, :1]).all(dim=1)


def group_advantages(
    rewards: torch.Tensor, n: int, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """GRPO outcome advantages: each reward minus its group mean (groups are consecutive blocks of ``n``), divided by
    ``group std + eps`` when ``normalize_std``. The std is the **unbiased** one (``correction=1``, ``torch.std``'s
    default), the definition of DeepSeekMath and TRL's ``GRPOTrainer``. ``normalize_std=False`` is Dr. GRPO (Liu et
    al. 2025): mean-centred, no division. A group whose rewards are all equal gets exactly 0 (not float rounding of
    ``r - mean``), as does any group of ``n == 1``. Returns a detached 1-D tensor, float32 (float64 for float64)."""
    g = _groups(rewards, n).to(_float_dtype(rewards))
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std and n > 1:
        adv = adv / (g.std(dim=1, keepdim=True, correction=1) + eps)
    adv = torch.where(constant_groups(rewards, n)[:, None], torch.zeros((), dtype=adv.dtype, device=adv.device), adv)
    return adv.reshape(-1)


# ------------------------------------------------------------------------------------------------- policy / value


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    *,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate per token, summed over the masked tokens: ``(loss_sum, count, stats)``.

    ``ratio = exp(logp - old_logp)`` (log-ratio clamped to +-20 as verl); ``pg1 = -A * ratio``,
    ``pg2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)``, ``loss = max(pg1, pg2)`` (asymmetric ``clip_high`` >
    ``clip_low`` is DAPO's clip-higher). Dual clip (Ye et al. 2020, as verl): where ``A < 0``,
    ``loss = min(loss, -A * dual_clip)``; ``dual_clip`` must be > 1, ``None`` disables it.

    Only ``logp`` gets a gradient (``old_logp``, ``advantages``, ``weights`` are detached), and only at masked
    positions; where the clip or the dual clip acts the gradient is 0. ``weights`` (optional, ``[batch, seq]``)
    multiply the per-token loss: truncated importance weights, or :func:`sequence_mean_weights` (then the count the
    caller divides by is the number of sequences, not ``count``).

    ``stats`` are detached float32 sums over the masked tokens: ``clip_count`` (tokens where ``pg2 > pg1``, the clip
    acted; as verl it includes tokens the dual clip then overrides), ``dual_clip_count`` (``A < 0`` tokens where the
    dual-clip bound is below the clipped loss), ``ratio_sum`` and ``kl_old_sum`` (k1, ``old_logp - logp``)."""
    _check_same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    adv = torch.where(keep, advantages.detach().float(), zero)
    log_ratio = torch.where(keep, logp.float() - old_logp.detach().float(), zero)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(pg1, pg2)
    clipped = keep & (pg2 > pg1)
    dual_clipped = torch.zeros_like(keep)
    if dual_clip is not None:
        pg3 = -adv * dual_clip
        negative = adv < 0
        dual_clipped = keep & negative & (loss > pg3)
        loss = torch.where(negative, torch.minimum(loss, pg3), loss)
    if weights is not None:
        _check_same_shape(logp=logp, weights=weights)
        loss = loss * torch.where(keep, weights.detach().float(), zero)
    loss_sum = torch.where(keep, loss, zero).sum()
    with torch.no_grad():
        stats = {
            "clip_count": clipped.sum().float(),
            "dual_clip_count": dual_clipped.sum().float(),
            "ratio_sum": torch.where(keep, ratio, zero).sum(),
            "kl_old_sum": torch.where(keep, -log_ratio, zero).sum(),
        }
    return loss_sum, keep.sum().to(torch.int32), {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = None,
    *,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss summed over the masked tokens: ``(loss_sum, count, stats)``; ``weights`` (optional) multiply
    the per-token loss as in :func:`policy_loss`.

    Per token ``0.5 * max((V - R)^2, (clip(V, old_V - clip, old_V + clip) - R)^2)``; ``clip=None`` is the unclipped
    ``0.5 * (V - R)^2``. Only ``values`` gets a gradient, only at masked positions. ``stats["clip_count"]``: detached
    float32 count of tokens where the clipped term is the larger one (there the gradient is 0)."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip is not None and not clip > 0:
        raise ValueError(f"value clip must be > 0 (or None), got {clip}")
    keep = mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=values.device)
    v = torch.where(keep, values.float(), zero)
    r = torch.where(keep, returns.detach().float(), zero)
    unclipped = (v - r).square()
    if clip is None:
        per_token = 0.5 * unclipped
        clipped = torch.zeros_like(keep)
    else:
        old = torch.where(keep, old_values.detach().float(), zero)
        v_clipped = torch.clamp(v, old - clip, old + clip)  # V itself where it is inside: no rounding of old+(V-old)
        clipped_sq = (v_clipped - r).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped_sq)
        clipped = keep & (clipped_sq > unclipped)
    if weights is not None:
        _check_same_shape(values=values, weights=weights)
        per_token = per_token * torch.where(keep, weights.detach().float(), zero)
    loss_sum = torch.where(keep, per_token, zero).sum()
    return loss_sum, keep.sum().to(torch.int32), {"clip_count": clipped.sum().float().detach()}


# ------------------------------------------------------------------------------------------ entropy, KL, weights


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position entropy ``-sum_v p log p`` of ``softmax(logits)``, ``[b, s, vocab] -> [b, s]``, via
    ``log_softmax`` in float32 (stable for large logits; ``-inf`` logits, e.g. a masked vocabulary, contribute 0 and a
    finite gradient)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    safe_logp = torch.where(p > 0, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    return -(p * safe_logp).sum(dim=-1)


def sampling_logits(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of the distribution a rollout samples from, ``[..., vocab]`` (full vocabulary): ``logits /
    temperature``, and with ``top_p < 1`` every token outside the nucleus set to ``-inf`` -- megatron's rule, applied
    to the tempered probabilities sorted in descending order: a token stays when the probability of the tokens before
    it is at most ``top_p`` (so the most likely token always stays). ``keep`` (``[...]`` token ids, e.g. the labels)
    stays in any case, so the log-prob of a sampled token is finite even where a tie or a rounding puts it at the
    nucleus' edge. ``temperature=0`` (greedy) is taken as 1. The nucleus is chosen without gradient; the kept logits
    carry it."""
    x = logits.float()
    if temperature and temperature != 1.0:
        x = x / temperature
    if top_p >= 1.0:
        return x
    with torch.no_grad():
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
        drop_sorted[..., 1:] = cum[..., :-1] > top_p  # the mass of the tokens before this one
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        if keep is not None:
            drop.scatter_(-1, keep.unsqueeze(-1).long(), False)
    return x.masked_fill(drop, float("-inf"))


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, clamp: float | None = None) -> torch.Tensor:
    """Per-token estimators of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence"), with
    ``log_ratio = logp - ref_logp``: ``k1 = log_ratio``; ``k2 = 0.5 * log_ratio^2``;
    ``k3 = exp(-log_ratio) - 1 + log_ratio`` (>= 0, computed with ``expm1`` for accuracy near 0), capped at ``clamp``
    when given (verl's low-variance KL caps it at 10: one token far off the reference cannot dominate). Unmasked:
    reduce with :func:`~evolm_nemo.losses.token.masked_token_sum`. Gradient flows through both inputs."""
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    log_ratio = logp.float() - ref_logp.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        return (torch.expm1(-log_ratio) + log_ratio).clamp(min=0, max=clamp)
    raise ValueError(f"unknown KL estimator kind {kind!r}; expected 'k1', 'k2' or 'k3'")


def sequence_mean_weights(mask: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` float32 weights ``1 / len_i`` on the masked positions of row ``i`` (0 elsewhere; a row with no
    token gets 0), so ``sum(weights * per_token) / num_sequences`` is the mean over sequences of each sequence's
    token-mean loss. With these weights the count a loss returns (the engine's divisor) must be the number of
    sequences with at least one token, ``(mask.sum(-1) > 0).sum()``, not the number of tokens."""
    keep = mask.bool()
    lengths = keep.sum(dim=-1, keepdim=True).clamp(min=1).to(torch.float32)
    return torch.where(keep, 1.0 / lengths, torch.zeros((), dtype=torch.float32, device=mask.device))


@torch.no_grad()
def truncated_importance_weights(train_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS) weights ``min(exp(train_logp - rollout_logp), cap)``, detached: corrects
    for the mismatch between the rollout engine's and the trainer's probabilities of the same tokens. Pass as
    ``policy_loss(..., weights=...)``."""
    _check_same_shape(train_logp=train_logp, rollout_logp=rollout_logp)
    if not cap > 0:
        raise ValueError(f"TIS cap must be > 0, got {cap}")
    return torch.exp(train_logp.detach().float() - rollout_logp.detach().float()).clamp(max=cap)
