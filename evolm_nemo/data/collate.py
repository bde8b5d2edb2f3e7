"""Microbatch layout of whole sequences (prompt + response), shared by reward models, DPO and the RL reward model."""

from __future__ import annotations

import numpy as np
import torch


def collate_sequences(seqs: list[np.ndarray], prompt_lens: list[int], seq: int, pad_id: int) -> dict:
    """Right-padded ``tokens`` (the whole sequence: the score needs no shifted labels), ``position_ids``, ``last``
    (the index of each sequence's last token, where its score is read) and, for LM use, ``labels``/``loss_mask``
    over the response tokens (the positions predicting them)."""
    b = len(seqs)
    tokens = torch.full((b, seq), pad_id, dtype=torch.long)
    labels = torch.full((b, seq), pad_id, dtype=torch.long)
    mask = torch.zeros((b, seq), dtype=torch.float32)
    last = torch.zeros(b, dtype=torch.long)
    for row, (ids, plen) in enumerate(zip(seqs, prompt_lens)):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        n = len(ids)
        if n > seq:
            raise ValueError(f"sequence of {n} ids does not fit a microbatch of length {seq}")
        tokens[row, :n] = ids
        labels[row, :n - 1] = ids[1:]
        mask[row, max(int(plen) - 1, 0):n - 1] = 1.0
        last[row] = n - 1
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(b, -1).contiguous()
    return {"tokens": tokens, "position_ids": position_ids, "last": last, "labels": labels, "loss_mask": mask}
