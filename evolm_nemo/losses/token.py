"""Masked next-token loss: pretraining and CPT (every token counts) and SFT (answer tokens only)."""

from __future__ import annotations

import torch


def masked_token_sum(per_token: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of per_token where mask, number of masked tokens)``: the loss is fp32, the count an int32 tensor on
    the same device (megatron adds the counts of all microbatches into an int tensor).

    ``per_token`` is ``[batch, seq]`` cross-entropy (megatron's GPTModel returns it when given labels); ``mask`` is
    ``[batch, seq]`` of 0/1 (prompt and padding 0). Masked positions contribute exactly zero loss and zero gradient
    (``where``, not a multiplication, so even an inf/nan loss at a masked position stays out of the sum)."""
    if per_token.shape != mask.shape:
        raise ValueError(f"per-token losses {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ in shape")
    keep = mask.bool()
    losses = torch.where(keep, per_token.float(), torch.zeros((), dtype=torch.float32, device=per_token.device))
    return losses.sum(), keep.sum().to(torch.int32)


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-token mean over ``mask`` (0 when nothing is masked in): the reference the tests hold the engine to."""
    total, count = masked_token_sum(per_token, mask)
    return total / count.clamp(min=1)
