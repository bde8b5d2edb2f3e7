"""How a rank's share of a global batch is laid into microbatches: by count (``micro_batch_size`` examples, padded to
the longest), by a token budget (``parallel.max_tokens_per_microbatch``: as many whole examples, in order, as fit the
budget once padded), or packed (``train.packing``: whole examples best-fit into rows of a fixed capacity, laid back
to back with position ids restarting per example and attention that never crosses one).

Every layout holds the same examples, each once and whole; the losses are sums over tokens divided once by the
global batch's token count, so the layout changes only the order of floating-point additions, never what is
optimised. Pure functions of lengths: a resumed run lays out its batches exactly as the uninterrupted one did.
"""

from __future__ import annotations

import bisect

import math

import numpy as np
import torch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def row_multiple(parallel, pad: int = 1) -> int:
    """What every microbatch row's length is a multiple of: ``pad`` (a kernel-friendly padding) and, under sequence
    parallelism, the TP size (each rank holds an equal slice of the sequence)."""
    return math.lcm(pad, parallel.tp if parallel.sp else 1)


def by_count(n: int, size: int) -> list[list[int]]:
    """Positions ``0..n-1`` in groups of ``size`` (the last may be shorter)."""
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def by_token_budget(lengths, budget: int, multiple: int = 1, rows_per: int = 1) -> list[list[int]]:
    """Consecutive positions grouped while ``rows x longest`` (the longest rounded up to ``multiple``; ``rows_per``
    rows per position, 2 for a pair) stays within ``budget`` tokens; a group always takes at least one position
    (verl's ``use_dynamic_bsz`` with order kept)."""
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(int(x) for x in lengths):
        longer = max(longest, round_up(n, multiple))
        if current and longer * rows_per * (len(current) + 1) > budget:
            groups.append(current)
            current, longer = [], round_up(n, multiple)
        current.append(i)
        longest = longer
    if current:
        groups.append(current)
    return groups


def best_fit(lengths, capacity: int) -> list[list[int]]:
    """Positions packed into bins of ``capacity`` tokens: each example, in order, goes to the open bin it fills most
    tightly (the least room left that still fits; the earliest such bin on a tie), else to a new bin. Never splits an
    example; deterministic. Bins keep their examples in order and are listed by creation."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i, n in enumerate(int(x) for x in lengths):
        if n > capacity:
            raise ValueError(f"an example of {n} tokens does not fit a bin of {capacity}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            left, b = room.pop(k)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


def _pack(items, length: int, pad_id: int, shifted: bool) -> dict[str, torch.Tensor]:
    """One packed row ``[1, length]`` of ``(ids, prompt_len)`` items laid back to back: each item's inputs (``ids[:-1]``
    when ``shifted``, else the whole ``ids``), ``labels`` (the next id within the item), ``loss_mask`` on the
    positions whose label is past the prompt, position ids from 0, ``segment`` (the item's number, -1 on padding),
    ``last`` (the row position of each item's last input); the rest of the row is padding (its own segment, no loss).
    ``cu_seqlens`` (int32) bounds the segments, padding included, and ``max_seqlen`` is the longest: megatron's
    ``PackedSeqParams`` (THD)."""
    tokens = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), pad_id, dtype=torch.long)
    mask = torch.zeros((1, length), dtype=torch.float32)
    position_ids = torch.zeros((1, length), dtype=torch.long)
    segment = torch.full((1, length), -1, dtype=torch.long)
    last = torch.zeros(len(items), dtype=torch.long)
    bounds, at = [0], 0
    for j, (ids, prompt_len) in enumerate(items):
        ids = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        inputs = ids[:-1] if shifted else ids
        n = len(inputs)
        if at + n > length:
            raise ValueError(f"{'examples' if shifted else 'sequences'} of {at + n} tokens do not fit a packed row "
                             f"of {length}")
        tokens[0, at:at + n] = inputs
        labels[0, at:at + len(ids) - 1] = ids[1:]
        mask[0, at + max(int(prompt_len) - 1, 0):at + len(ids) - 1] = 1.0
        position_ids[0, at:at + n] = torch.arange(n)
        segment[0, at:at + n] = j
        last[j] = at + n - 1
        at += n
        bounds.append(at)
    if at < length:
        position_ids[0, at:] = torch.arange(length - at)
        bounds.append(length)
    cu = torch.tensor(bounds, dtype=torch.int32)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": position_ids, "segment": segment,
            "last": last, "cu_seqlens": cu, "max_seqlen": (cu[1:] - cu[:-1]).max().reshape(1)}


def collate_packed(examples, length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``data.sft.collate`` packed into one row ``[1, length]``: example ``j`` contributes ``tokens = ids[:-1]``,
    ``labels = ids[1:]``, ``loss_mask`` 1 where the label is an answer token, position ids from 0 and ``segment`` j
    (``_pack``)."""
    return _pack(examples, length, pad_id, shifted=True)


def collate_packed_sequences(seqs, prompt_lens, length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """``data.collate.collate_sequences`` packed into one row ``[1, length]``: each whole sequence as ``tokens``,
    ``labels`` (the next id within the sequence), ``loss_mask`` over the positions predicting response tokens,
    ``last`` (the row position of each sequence's last token, where its score is read) and ``segment`` (``_pack``)."""
    return _pack(list(zip(seqs, prompt_lens)), length, pad_id, shifted=False)


def per_sequence_sum(values: torch.Tensor, mask: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of values where mask, count)`` per sequence: per row of a padded ``[b, s]`` microbatch, per segment of a
    packed row (``collate_packed_sequences``), in the microbatch's sequence order."""
    keep = mask.bool()
    picked = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if "segment" not in batch:
        return picked.sum(1), keep.sum(1)
    seg = batch["segment"].clamp(min=0).flatten()
    k = batch["last"].numel()
    sums = torch.zeros(k, dtype=values.dtype, device=values.device).index_add(0, seg, picked.flatten())
    counts = torch.zeros(k, dtype=torch.long, device=values.device).index_add(0, seg, keep.flatten().long())
    return sums, counts


def packed_seq_params(batch: dict):
    """megatron's ``PackedSeqParams`` (THD, self-attention) for a ``collate_packed`` row, or None for a padded one."""
    if "cu_seqlens" not in batch:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = batch["cu_seqlens"].to(torch.int32)
    longest = int(batch["max_seqlen"].max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)
