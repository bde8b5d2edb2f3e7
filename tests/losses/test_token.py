"""The masked token loss as a pure function: hand-computed values, zero weight and zero gradient on masked
positions, a non-finite loss at a masked position kept out of the sum, and the sum/count pair the engine divides once."""

import torch

from evolm_nemo.losses import masked_token_sum, token_mean


def test_matches_hand_computed_masked_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 1]])
    total, count = masked_token_sum(per_token, mask)
    assert float(total) == 2.0 + 3.0 + 40.0 and int(count) == 3 and count.dtype == torch.int32
    assert abs(float(token_mean(per_token, mask)) - 45.0 / 3) < 1e-7
    # the per-token mean over a global batch is not the mean of per-row means
    assert abs(float(token_mean(per_token, mask)) - ((2.5 + 40.0) / 2)) > 1.0


def test_masked_positions_get_zero_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    with torch.no_grad():
        logits[1, 4] = 1e4  # a padded position with an extreme (finite) logit
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1), reduction="none").view(2, 5)
    total, count = masked_token_sum(ce, mask)
    (total / count).backward()
    assert torch.isfinite(total)
    grad = logits.grad
    assert torch.all(grad[mask == 0] == 0)
    assert torch.all(grad[mask == 1].abs().sum(-1) > 0)
    # equal to the hand-written masked loss on the unmasked positions
    want = sum(float(ce[b, t]) for b in range(2) for t in range(5) if mask[b, t]) / int(mask.sum())
    assert abs(float(total / count) - want) < 1e-6


def test_empty_mask_is_zero_not_nan():
    total, count = masked_token_sum(torch.ones(1, 3), torch.zeros(1, 3))
    assert float(total) == 0.0 and int(count) == 0 and float(token_mean(torch.ones(1, 3), torch.zeros(1, 3))) == 0.0


def test_non_finite_loss_at_a_masked_position_stays_out_of_the_sum():
    per_token = torch.tensor([[1.0, float("inf"), float("nan")]])
    total, count = masked_token_sum(per_token, torch.tensor([[1, 0, 0]]))
    assert float(total) == 1.0 and int(count) == 1
