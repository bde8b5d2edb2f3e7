"""Microbatch layouts as pure functions (no megatron): by count, by a token budget, best-fit packing, and the packed
row itself (segments, position ids, loss mask, cu_seqlens)."""

import numpy as np
import pytest
import torch

from evolm_nemo.data.packing import best_fit, by_count, by_token_budget, collate_packed
from evolm_nemo.data.sft import collate


def test_by_count_and_token_budget_keep_order_and_every_example():
    assert by_count(5, 2) == [[0, 1], [2, 3], [4]]
    lengths = [10, 30, 5, 60, 60, 7]
    groups = by_token_budget(lengths, 64)
    assert [i for g in groups for i in g] == list(range(6))  # every example once, in order
    assert groups == [[0, 1], [2], [3], [4], [5]]  # 2 x 30 = 60 fits; 3 x 30 = 90 does not; 2 x 60 > 64
    for g in groups:
        assert max(lengths[i] for i in g) * len(g) <= 64
    # the longest rounded up to a multiple counts: 2 x 32 = 64 fits, 3 x 32 does not
    assert by_token_budget([30, 31, 2], 64, multiple=8) == [[0, 1], [2]]
    assert by_token_budget([100], 64) == [[0]]  # a group always takes one example


def test_best_fit_is_tight_whole_and_deterministic():
    lengths = [70, 50, 40, 30, 60, 20, 10]
    bins = best_fit(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(7))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    # 70 | 50 | 40 -> 50's bin (tightest: 10 left) | 30 -> 70's bin (0 left) | 60 -> new | 20 -> 60's bin (20 left
    # is tighter than none) | 10 -> 50+40's bin
    assert bins == [[0, 3], [1, 2, 6], [4, 5]]
    assert best_fit(lengths, 100) == bins
    with pytest.raises(ValueError, match="does not fit"):
        best_fit([101], 100)


def test_packed_row_holds_each_example_as_the_padded_batch_does():
    rng = np.random.default_rng(0)
    examples = [(rng.integers(4, 500, size=n), p) for n, p in ((9, 4), (40, 12), (17, 3))]
    padded = collate(examples, 39, pad_id=2)
    row = collate_packed(examples, 70, pad_id=2)  # 8 + 39 + 16 = 63 tokens, 7 of padding
    assert row["tokens"].shape == (1, 70)
    assert row["cu_seqlens"].tolist() == [0, 8, 47, 63, 70] and row["cu_seqlens"].dtype == torch.int32
    assert int(row["max_seqlen"]) == 39
    at = 0
    for r, (ids, _) in enumerate(examples):
        n = len(ids) - 1
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(row[key][0, at:at + n], padded[key][r, :n]), key
        assert row["position_ids"][0, at:at + n].tolist() == list(range(n))
        at += n
    assert row["loss_mask"][0, at:].sum() == 0  # padding carries no loss
    assert row["loss_mask"].sum() == padded["loss_mask"].sum()
    with pytest.raises(ValueError, match="do not fit"):
        collate_packed(examples, 60, pad_id=2)
