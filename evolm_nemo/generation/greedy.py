"""Greedy decoding with the megatron model itself (one process, pp=1): demo samples and conversion checks.

Rollouts at scale use megatron-core's inference engine or the HF/vLLM/TRT-LLM backends; this is the small,
exact reference loop (full forward per token, no KV cache).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_ids(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None,
               max_length: int | None = None) -> list[int]:
    """Token ids generated after ``prompt_ids`` (argmax each step; stops at EOS or ``max_length`` total)."""
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    ids = list(prompt_ids)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            if max_length is not None and len(ids) >= max_length:
                break
            tokens = torch.tensor([ids], dtype=torch.long)
            positions = torch.arange(len(ids), dtype=torch.long).unsqueeze(0)
            logits = inner(tokens, positions, None)
            next_id = int(logits[0, -1].float().argmax())
            ids.append(next_id)
            new.append(next_id)
            if eos_id is not None and next_id == eos_id:
                break
    finally:
        inner.train(was_training)
    return new

