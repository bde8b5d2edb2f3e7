"""Reward-model and preference losses against their formulas on fixed tensors (no megatron)."""

import math

import numpy as np
import pytest
import torch

from evolm_nemo.losses import preference


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_outcome_bce_and_accuracy():
    s, y = torch.tensor([2.0, -1.0, 0.5, -3.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    want = [-math.log(sig(2.0)), -math.log(sig(-1.0)), -math.log(1 - sig(0.5)), -math.log(1 - sig(-3.0))]
    assert torch.allclose(preference.outcome_bce(s, y), torch.tensor(want), atol=1e-6)
    assert preference.outcome_accuracy(s, y).tolist() == [1.0, 0.0, 0.0, 1.0]


def test_bradley_terry_margin_and_accuracy():
    c, r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])
    assert torch.allclose(preference.bradley_terry(c, r), torch.tensor([-math.log(sig(1.0)), -math.log(sig(-1.0)),
                                                                         math.log(2.0)]), atol=1e-6)
    assert torch.allclose(preference.bradley_terry(c, r, margin=0.5)[0], torch.tensor(-math.log(sig(0.5))), atol=1e-6)
    assert preference.pair_accuracy(c, r).tolist() == [1.0, 0.0, 0.5]


def test_dpo_loss_label_smoothing_and_rewards():
    pc, pr = torch.tensor([-5.0, -4.0]), torch.tensor([-6.0, -3.0])
    rc, rr = torch.tensor([-5.5, -4.0]), torch.tensor([-5.5, -4.0])
    beta = 0.1
    h = [(-5.0 + 5.5) - (-6.0 + 5.5), (-4.0 + 4.0) - (-3.0 + 4.0)]  # [1.0, -1.0]
    loss, cr, rj = preference.preference_loss(pc, pr, rc, rr, beta)
    assert torch.allclose(loss, torch.tensor([-math.log(sig(beta * x)) for x in h]), atol=1e-6)
    assert torch.allclose(cr, beta * torch.tensor([0.5, 0.0])) and torch.allclose(rj, beta * torch.tensor([-0.5, 1.0]))
    eps = 0.2
    smooth, _, _ = preference.preference_loss(pc, pr, rc, rr, beta, label_smoothing=eps)
    want = [-(1 - eps) * math.log(sig(beta * x)) - eps * math.log(sig(-beta * x)) for x in h]
    assert torch.allclose(smooth, torch.tensor(want), atol=1e-6)
    # policy == reference: every pair costs log 2
    same, _, _ = preference.preference_loss(pc, pr, pc, pr, beta)
    assert torch.allclose(same, torch.full((2,), math.log(2.0)))


def test_ipo_loss():
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    beta = 0.5
    loss, _, _ = preference.preference_loss(pc, pr, rc, rr, beta, loss_type="ipo")
    h = 0.5 - (-0.5)
    assert torch.allclose(loss, torch.tensor([(h - 1 / (2 * beta)) ** 2]))
    with pytest.raises(ValueError):
        preference.preference_loss(pc, pr, rc, rr, beta, loss_type="nope")


def test_gradient_flows_through_policy_only():
    pc = torch.tensor([-1.0], requires_grad=True)
    rc = torch.tensor([-1.0], requires_grad=True)
    loss, cr, _ = preference.preference_loss(pc, torch.tensor([-2.0]), rc, torch.tensor([-2.0]), 0.1)
    loss.sum().backward()
    assert pc.grad is not None and pc.grad.item() < 0  # raising the chosen log-prob lowers the loss
    assert not cr.requires_grad


def test_roc_auc_against_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (40,), generator=g).float()  # many ties
    y = torch.randint(0, 2, (40,), generator=g)
    pos, neg = s[y == 1], s[y == 0]
    want = sum((a > b) + 0.5 * (a == b) for a in pos for b in neg).item() / (len(pos) * len(neg))
    assert preference.roc_auc(s, y) == pytest.approx(want, abs=1e-12)
    assert preference.roc_auc([0.1, 0.9], [0, 1]) == 1.0 and preference.roc_auc([0.9, 0.1], [0, 1]) == 0.0
    assert preference.roc_auc([1.0, 2.0], [1, 1]) is None  # undefined (one class): null in metrics.jsonl


def test_pairwise_auc_of_chained_preferences():
    """a>b, b>c: b is chosen once and rejected once. A perfect scorer gets 1 (b never faces itself); the stored
    labels (b = chosen, its first role) gave 1 whatever b's score was, with c the only negative."""
    pairs = np.array([[0, 1], [1, 2]])
    assert preference.roles_auc({0: 3.0, 1: 2.0, 2: 1.0}, pairs) == 1.0
    assert preference.roles_auc({0: 3.0, 1: 0.0, 2: 1.0}, pairs) == pytest.approx(2 / 3)  # b under c: one of three
    g = torch.Generator().manual_seed(1)
    pairs = torch.randint(0, 12, (30, 2), generator=g).numpy()
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    scores = dict(enumerate(torch.randint(0, 4, (12,), generator=g).tolist()))
    chosen, rejected = set(pairs[:, 0].tolist()), set(pairs[:, 1].tolist())
    cmp = [(a, b) for a in chosen for b in rejected if a != b]
    want = sum((scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b]) for a, b in cmp) / len(cmp)
    assert preference.roles_auc(scores, pairs) == pytest.approx(want, abs=1e-12)
    assert preference.roles_auc({0: 1.0, 1: 0.0}, np.array([[0, 1], [1, 0]])) == 0.5  # contradictory: half either way
    assert preference.roles_auc({0: 1.0}, np.array([[0, 0]])) is None  # no two responses compare
