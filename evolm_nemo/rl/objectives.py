"""The RL objectives on megatron models: per-token log-probs and entropy under tensor parallelism, the actor's PPO /
GRPO loss and the critic's value loss in the engine's ``(loss_sum, count, logs)`` contract, and the log-prob step of
forward-only passes (``train.forward``). Loss formulas live in ``evolm_nemo.losses.rl`` (pure, tested without
megatron)."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from evolm_nemo.data.packing import collate_packed, packed_seq_params, per_sequence_sum, round_up
from evolm_nemo.data.sft import collate as sft_collate
from evolm_nemo.losses.rl import (entropy_from_logits, kl_estimate, policy_loss, sampling_logits,
                                  sequence_mean_weights, value_loss)
from evolm_nemo.train.forward import collect_output


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position from (vocab-parallel) logits ``[b, s, V/tp]``."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    return -vocab_parallel_cross_entropy(logits.float().clone(), labels)  # it works in place on its input


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the full next-token distribution per position, from vocab-parallel logits (autograd through the
    tensor-parallel sums)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() == 1:
        return entropy_from_logits(logits.float())
    x = logits.float()
    m = x.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    e = torch.exp(x - m)
    z = reduce_from_tensor_model_parallel_region(e.sum(-1))
    ex = reduce_from_tensor_model_parallel_region((e * x).sum(-1))
    return torch.log(z) + m.squeeze(-1) - ex / z


def policy_logprobs(logits: torch.Tensor, labels: torch.Tensor, rl,
                    entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(log p(label), entropy)`` per position under the distribution the rollouts sample from (README, "RL: the
    sampled distribution"): the actor's logits divided by ``rl.temperature`` and, with ``rl.top_p < 1``, cut to the
    top-p nucleus (``losses.rl.sampling_logits``, the rule the rollout engine applies). Old, new and reference
    log-probs all go through here, so the PPO ratio and the KL compare one distribution. Greedy rollouts
    (temperature 0) train the untempered policy. ``entropy=False``: None in its place (the forward-only passes need
    only the log-probs; the entropy is one more full-vocabulary tensor per position)."""
    temperature = rl.temperature if rl.temperature > 0 else 1.0
    if rl.top_p >= 1.0 or rl.temperature == 0:
        x = logits.float() / temperature if temperature != 1.0 else logits
        return token_logprobs(x, labels), token_entropy(x) if entropy else None
    from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(logits.float())  # the nucleus needs the whole vocabulary
    x = sampling_logits(full, temperature, rl.top_p, keep=labels)
    logp = torch.log_softmax(x, dim=-1).gather(-1, labels.unsqueeze(-1).long()).squeeze(-1)
    return logp, entropy_from_logits(x) if entropy else None


def collate(seqs: list[tuple[list[int], int]], extra: dict[str, list[list[float]]], pad_id: int,
            packed_length: int | None = None, multiple: int = 1) -> dict:
    """Right-padded microbatch of ``(ids, prompt_len)``: tokens/labels/position_ids and ``loss_mask`` on the positions
    that predict response tokens, plus each ``extra`` per-response-token list placed at those positions. With
    ``packed_length``: one packed row of that length instead (``data.packing.collate_packed``: THD, a segment per
    sequence). The row length is rounded up to a ``multiple`` (sequence parallelism splits it over the TP ranks)."""
    if packed_length is not None:
        batch = collate_packed(seqs, round_up(packed_length, multiple), pad_id)
        starts = np.cumsum([0] + [len(ids) - 1 for ids, _ in seqs[:-1]])
        rows = [0] * len(seqs)
    else:
        batch = sft_collate(seqs, round_up(max(len(ids) for ids, _ in seqs) - 1, multiple), pad_id)
        starts, rows = [0] * len(seqs), list(range(len(seqs)))
    shape = batch["tokens"].shape
    for key, values_of in extra.items():
        t = torch.zeros(shape, dtype=torch.float32)
        for (ids, plen), values, row, at in zip(seqs, values_of, rows, starts):
            start = int(at) + max(plen - 1, 0)
            t[row, start:start + len(values)] = torch.as_tensor(values, dtype=torch.float32)
        batch[key] = t
    return batch


def per_token(out: torch.Tensor, batch: dict) -> list[list[float]]:
    """A microbatch's ``[b, s]`` output back to one list per sequence over its response positions (``loss_mask``),
    in the microbatch's sequence order: per row, or per segment of a packed row."""
    mask = batch["loss_mask"].bool()
    if "segment" not in batch:
        return [out[row][mask[row]].tolist() for row in range(out.shape[0])]
    seg = batch["segment"][0]
    return [out[0][mask[0] & (seg == j)].tolist() for j in range(int(seg.max()) + 1)]


# --------------------------------------------------------------------------------------------------- forward only


def logprob_forward_step(rl, data_iterator, model):
    """Forward-only step: the per-token log-probs of ``policy_logprobs`` (``partial`` it with ``rl``)."""
    b = next(data_iterator)
    logits = model(b["tokens"], b["position_ids"], None, packed_seq_params=packed_seq_params(b))
    return policy_logprobs(logits, b["labels"], rl, entropy=False)[0], partial(collect_output, "logp")


# ------------------------------------------------------------------------------------------------------- training


def _weights(b: dict, rl) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token weights and, for seq_mean, the count to divide by (the engine divides by the global sum); a packed
    row's sequences are its segments."""
    mask = b["loss_mask"]
    if rl.loss_agg != "seq_mean":
        return mask, None
    if "segment" not in b:
        return sequence_mean_weights(mask), (mask.sum(-1) > 0).sum().to(torch.int32)
    _, lengths = per_sequence_sum(mask.float(), mask, b)
    seg = b["segment"].clamp(min=0)
    weights = torch.where(mask.bool(), 1.0 / lengths.clamp(min=1).to(torch.float32)[seg],
                          torch.zeros((), dtype=torch.float32, device=mask.device))
    return weights, (lengths > 0).sum().to(torch.int32)


def _actor_loss(b: dict, rl, logits: torch.Tensor):
    mask = b["loss_mask"]
    logp, entropy = policy_logprobs(logits, b["labels"], rl)
    weights, seq_count = _weights(b, rl)
    # truncated importance weights correct the policy gradient only (as verl's): entropy and KL keep the plain weights
    pg_weights = weights * b["tis"] if "tis" in b else weights
    high = rl.ratio_eps if rl.ratio_eps_high is None else rl.ratio_eps_high
    pg_sum, count, stats = policy_loss(logp, b["old_logp"], b["advantages"], mask, rl.ratio_eps, high,
                                       rl.dual_clip, weights=pg_weights)
    total = pg_sum
    if rl.entropy_bonus:
        total = total - rl.entropy_bonus * torch.where(mask.bool(), entropy * weights, torch.zeros_like(entropy)).sum()
    kl_sum = torch.zeros((), device=logp.device)
    if "ref_logp" in b:
        # kl=reward penalises k1 in the rewards: the logged kl_ref is that one (kl=loss: the estimator it adds)
        kl = kl_estimate(logp, b["ref_logp"], "k1" if rl.kl == "reward" else rl.kl_estimator, rl.kl_clamp)
        kl_sum = torch.where(mask.bool(), kl, torch.zeros_like(kl)).sum()
        if rl.kl == "loss":
            total = total + rl.initial_policy_kl_penalty * torch.where(mask.bool(), kl * weights,
                                                                       torch.zeros_like(kl)).sum()
    n = seq_count if seq_count is not None else count
    tokens = mask.sum()
    logs = {"loss_sum": pg_sum.detach(), "tokens": n.detach().to(torch.float64),
            "entropy_sum": torch.where(mask.bool(), entropy, torch.zeros_like(entropy)).sum().detach(),
            "kl_ref_sum": kl_sum.detach(), "response_tokens": tokens.detach(),
            **{k: v.detach() for k, v in stats.items()}}
    return total, n, logs


def actor_forward_step(rl, data_iterator, model):
    b = next(data_iterator)
    return model(b["tokens"], b["position_ids"], None, packed_seq_params=packed_seq_params(b)), \
        partial(_actor_loss, b, rl)


def _critic_loss(b: dict, rl, values: torch.Tensor):
    mask = b["loss_mask"]
    values = values.squeeze(-1).float()
    weights, seq_count = _weights(b, rl)
    v_sum, count, stats = value_loss(values, b["old_values"], b["returns"], mask, rl.value_clip, weights=weights)
    n = seq_count if seq_count is not None else count
    return v_sum, n, {"loss_sum": v_sum.detach(), "tokens": n.detach().to(torch.float64),
                      **{f"value_{k}": v.detach() for k, v in stats.items()}}


def critic_forward_step(rl, data_iterator, model):
    b = next(data_iterator)
    return model(b["tokens"], b["position_ids"], None, packed_seq_params=packed_seq_params(b)), \
        partial(_critic_loss, b, rl)
