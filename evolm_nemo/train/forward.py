"""Forward-only passes through megatron's pipeline engine: the per-microbatch outputs of a model (per-token values,
log-probs, ...) collected instead of a loss. Used by the RM / DPO stages, the RL loop and the RL reward model."""

from __future__ import annotations

from functools import partial

import torch

from evolm_nemo.data.packing import packed_seq_params


def collect_output(key: str, output: torch.Tensor):
    """A forward-only "loss" in the engine's ``(loss_sum, count, logs)`` contract that hands ``output`` back under
    ``key``."""
    zero = output.sum() * 0.0
    return zero, torch.zeros((), dtype=torch.int32, device=output.device), {key: output.detach()}


def value_forward_step(data_iterator, model):
    """A value-head model's ``[b, s]`` values (fp32); a packed row's too (``data.packing``)."""
    b = next(data_iterator)
    values = model(b["tokens"], b["position_ids"], None, packed_seq_params=packed_seq_params(b))
    return values.squeeze(-1).float(), partial(collect_output, "values")


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
