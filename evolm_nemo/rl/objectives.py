"""The RL objectives on megatron models: per-token log-probs and entropy under tensor parallelism, the actor's PPO /
GRPO loss and the critic's value loss in the engine's ``(loss_sum, count, logs)`` contract, and forward-only passes
that collect per-token outputs. Loss formulas live in ``evolm_nemo.losses.rl`` (pure, tested without megatron)."""

from __future__ import annotations

from functools import partial

import torch

from evolm_nemo.losses import rl as L


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
        return L.entropy_from_logits(logits.float())
    x = logits.float()
    m = x.detach().max(dim=-1, keepdim=True).values
    torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX,
                                 group=parallel_state.get_tensor_model_parallel_group())
    e = torch.exp(x - m)
    z = reduce_from_tensor_model_parallel_region(e.sum(-1))
    ex = reduce_from_tensor_model_parallel_region((e * x).sum(-1))
    return torch.log(z) + m.squeeze(-1) - ex / z


def collate(seqs: list[tuple[list[int], int]], extra: dict[str, list[list[float]]], pad_id: int) -> dict:
    """Right-padded microbatch of ``(ids, prompt_len)``: tokens/labels/position_ids and ``loss_mask`` on the positions
    that predict response tokens, plus each ``extra`` per-response-token list placed at those positions."""
    from evolm_nemo.data.sft import collate as sft_collate

    seq = max(len(ids) for ids, _ in seqs) - 1
    batch = sft_collate(seqs, seq, pad_id)
    for key, rows in extra.items():
        t = torch.zeros((len(seqs), seq), dtype=torch.float32)
        for row, ((ids, plen), values) in enumerate(zip(seqs, rows)):
            start = max(plen - 1, 0)
            t[row, start:start + len(values)] = torch.as_tensor(values, dtype=torch.float32)
        batch[key] = t
    return batch


# --------------------------------------------------------------------------------------------------- forward only


def _collect_loss(key: str, output: torch.Tensor):
    zero = output.sum() * 0.0
    return zero, torch.zeros((), dtype=torch.int32, device=output.device), {key: output.detach()}


def logprob_forward_step(data_iterator, model):
    b = next(data_iterator)
    logits = model(b["tokens"], b["position_ids"], None)
    return token_logprobs(logits, b["labels"]), partial(_collect_loss, "logp")


def value_forward_step(data_iterator, model):
    b = next(data_iterator)
    return model(b["tokens"], b["position_ids"], None).squeeze(-1).float(), partial(_collect_loss, "values")


def forward_collect(model, batches: list[dict], forward_step, micro_batch_size: int, rt) -> list[torch.Tensor]:
    """Per-microbatch ``[b, s]`` outputs of a forward-only pass (pp = 1)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    data = [{k: v.to(rt.device) for k, v in b.items()} for b in batches]
    with torch.no_grad():
        logs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=[model], num_microbatches=len(data),
            seq_length=max(b["tokens"].shape[1] for b in data), micro_batch_size=micro_batch_size,
            decoder_seq_length=max(b["tokens"].shape[1] for b in data), forward_only=True)
    return [next(iter(x.values())).cpu() for x in logs]


# ------------------------------------------------------------------------------------------------------- training


def _weights(b: dict, rl) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token weights and, for seq_mean, the count to divide by (the engine divides by the global sum)."""
    mask = b["loss_mask"]
    if rl.loss_agg == "seq_mean":
        return L.sequence_mean_weights(mask), (mask.sum(-1) > 0).sum().to(torch.int32)
    return mask, None


def _actor_loss(b: dict, rl, logits: torch.Tensor):
    mask = b["loss_mask"]
    logp = token_logprobs(logits, b["labels"])
    entropy = token_entropy(logits)
    weights, seq_count = _weights(b, rl)
    if "tis" in b:
        weights = weights * b["tis"]
    high = rl.ratio_eps if rl.ratio_eps_high is None else rl.ratio_eps_high
    pg_sum, count, stats = L.policy_loss(logp, b["old_logp"], b["advantages"], mask, rl.ratio_eps, high,
                                         rl.dual_clip, weights=weights)
    total = pg_sum
    if rl.entropy_bonus:
        total = total - rl.entropy_bonus * torch.where(mask.bool(), entropy * weights, torch.zeros_like(entropy)).sum()
    kl_sum = torch.zeros((), device=logp.device)
    if "ref_logp" in b:
        kl = L.kl_estimate(logp, b["ref_logp"], rl.kl_estimator)
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
    return model(b["tokens"], b["position_ids"], None), partial(_actor_loss, b, rl)


def _critic_loss(b: dict, rl, values: torch.Tensor):
    mask = b["loss_mask"]
    values = values.squeeze(-1).float()
    weights, seq_count = _weights(b, rl)
    v_sum, count, stats = L.value_loss(values, b["old_values"], b["returns"], mask, rl.value_clip, weights=weights)
    n = seq_count if seq_count is not None else count
    return v_sum, n, {"loss_sum": v_sum.detach(), "tokens": n.detach().to(torch.float64),
                      **{f"value_{k}": v.detach() for k, v in stats.items()}}


def critic_forward_step(rl, data_iterator, model):
    b = next(data_iterator)
    return model(b["tokens"], b["position_ids"], None), partial(_critic_loss, b, rl)
