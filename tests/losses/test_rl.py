"""RL objectives as pure functions, against hand-computed values on small fixed tensors: GAE (terminal value 0, prompt
and padding positions 0), whitening (local and from all-reducible moments), GRPO / Dr. GRPO group advantages, the PPO
clipped and dual-clipped policy loss (which branch acts, its counts, its gradient), the clipped value loss, entropy,
the KL estimators, sequence-mean weights and truncated importance weights."""

import math

import pytest
import torch

from evolm_nemo.losses import (
    constant_groups,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_estimate,
    masked_moments,
    masked_token_sum,
    mean_var_from_moments,
    policy_loss,
    sampling_logits,
    sequence_mean_weights,
    truncated_importance_weights,
    value_loss,
    whiten,
    whiten_with,
)

NAN = float("nan")


def close(got, want, tol=1e-6):
    want = torch.as_tensor(want, dtype=torch.float64)
    return torch.allclose(torch.as_tensor(got).to(torch.float64), want, atol=tol, rtol=0)


# ------------------------------------------------------------------------------------------------------------ GAE

# Row 0: a 2-token prompt, 3 response tokens, 2 padding positions. Prompt/padding rewards and values are junk (large,
# or nan) that must not leak in; in particular the value 7.0 right after the last response token must not be
# bootstrapped (terminal: next value 0).
MASK0 = [0, 0, 1, 1, 1, 0, 0]
REWARDS0 = [5.0, 5.0, 0.1, -0.2, 1.0, 9.0, NAN]
VALUES0 = [3.0, 3.0, 0.5, 0.4, 0.3, 7.0, NAN]
# Row 1: a 1-token prompt, 5 response tokens, 1 padding position.
MASK1 = [0, 1, 1, 1, 1, 1, 0]
REWARDS1 = [4.0, 0.0, 0.5, 0.0, 0.0, 1.0, 8.0]
VALUES1 = [2.0, 0.2, 0.4, 0.6, 0.8, 1.0, 6.0]


def _row0():
    return torch.tensor([REWARDS0]), torch.tensor([VALUES0]), torch.tensor([MASK0], dtype=torch.float32)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    adv, ret = gae(*_row0(), 1.0, 1.0)
    # A_t = sum(r_t..r_T) - V_t: 0.9-0.5, 0.8-0.4, 1.0-0.3
    assert close(adv, [[0, 0, 0.4, 0.4, 0.7, 0, 0]])
    assert close(ret, [[0, 0, 0.9, 0.8, 1.0, 0, 0]])


def test_gae_hand_computed_gamma_0_9_lambda_0_8():
    adv, ret = gae(*_row0(), 0.9, 0.8)
    # t=4 (last, terminal): delta = 1.0 + 0.9*0 - 0.3 = 0.7;                   A = 0.7
    # t=3: delta = -0.2 + 0.9*0.3 - 0.4 = -0.33;                                A = -0.33 + 0.72*0.7   = 0.174
    # t=2: delta =  0.1 + 0.9*0.4 - 0.5 = -0.04;                                A = -0.04 + 0.72*0.174 = 0.08528
    assert close(adv, [[0, 0, 0.08528, 0.174, 0.7, 0, 0]])
    assert close(ret, [[0, 0, 0.58528, 0.574, 1.0, 0, 0]])
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()


def test_gae_batch_of_two_rows_with_different_lengths():
    rewards = torch.tensor([REWARDS0, REWARDS1])
    values = torch.tensor([VALUES0, VALUES1])
    mask = torch.tensor([MASK0, MASK1], dtype=torch.float32)
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    # row 1: rewards-to-go 1.5, 1.5, 1.0, 1.0, 1.0 minus values 0.2, 0.4, 0.6, 0.8, 1.0
    assert close(adv, [[0, 0, 0.4, 0.4, 0.7, 0, 0], [0, 1.3, 1.1, 0.4, 0.2, 0.0, 0]])
    assert close(ret, [[0, 0, 0.9, 0.8, 1.0, 0, 0], [0, 1.5, 1.5, 1.0, 1.0, 1.0, 0]])
    adv, ret = gae(rewards, values, mask, 0.9, 0.8)
    # row 1, backwards: t=5 delta = 1 - 1 = 0, A = 0;  t=4 delta = 0.9*1.0 - 0.8 = 0.1, A = 0.1;
    # t=3 delta = 0.9*0.8 - 0.6 = 0.12, A = 0.12 + 0.72*0.1 = 0.192;
    # t=2 delta = 0.5 + 0.9*0.6 - 0.4 = 0.64, A = 0.64 + 0.72*0.192 = 0.77824;
    # t=1 delta = 0.9*0.4 - 0.2 = 0.16, A = 0.16 + 0.72*0.77824 = 0.7203328
    assert close(adv, [[0, 0, 0.08528, 0.174, 0.7, 0, 0], [0, 0.7203328, 0.77824, 0.192, 0.1, 0.0, 0]])
    assert close(ret, [[0, 0, 0.58528, 0.574, 1.0, 0, 0], [0, 0.9203328, 1.17824, 0.792, 0.9, 1.0, 0]])


def test_gae_terminal_and_masked_positions():
    # a single response token at the very end of the row and one followed by padding with a big value: both terminal
    mask = torch.tensor([[0, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.float32)
    rewards = torch.tensor([[1.0, 1.0, 1.0, 2.0], [1.0, 2.0, 1.0, 1.0]])
    values = torch.tensor([[9.0, 9.0, 9.0, 0.5], [9.0, 0.5, 100.0, 100.0]])
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    assert close(adv, [[0, 0, 0, 1.5], [0, 1.5, 0, 0]]) and close(ret, [[0, 0, 0, 2.0], [0, 2.0, 0, 0]])
    # an empty row is all zeros; no gradient is recorded
    v = torch.ones(1, 3, requires_grad=True)
    adv, ret = gae(torch.ones(1, 3), v, torch.zeros(1, 3), 1.0, 1.0)
    assert torch.all(adv == 0) and torch.all(ret == 0) and not adv.requires_grad and not ret.requires_grad


# ------------------------------------------------------------------------------------------------------ whitening


def test_whiten_is_mean_zero_std_one_over_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 8) * 4 + 2.5
    mask = (torch.rand(3, 8) > 0.4).float()
    x[mask == 0] = NAN  # junk outside the mask stays out
    w = whiten(x, mask)
    inside = w[mask.bool()].double()
    assert torch.all(w[mask == 0] == 0)
    assert abs(float(inside.mean())) < 1e-6
    assert abs(float(inside.std(correction=0)) - 1.0) < 1e-6
    # shift_mean=False only rescales: the mean is kept
    xs = x[mask.bool()].double()
    w2 = whiten(x, mask, shift_mean=False)
    assert close(w2[mask.bool()], (xs - xs.mean()) / xs.std(correction=0) + xs.mean(), tol=1e-5)
    assert torch.all(w2[mask == 0] == 0)


def test_whiten_with_global_moments_equals_whiten():
    torch.manual_seed(1)
    x = torch.randn(4, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 0]] * 2, dtype=torch.float32)
    total, total_sq, count = masked_moments(x, mask)
    assert total.dtype == total_sq.dtype == count.dtype == torch.float64 and int(count) == 16
    xs = x[mask.bool()].double()
    assert close(total, xs.sum(), 1e-12) and close(total_sq, (xs * xs).sum(), 1e-12)
    mean, var = mean_var_from_moments(total, total_sq, count)
    assert close(mean, xs.mean(), 1e-12) and close(var, xs.var(correction=0), 1e-12)
    assert torch.equal(whiten(x, mask), whiten_with(x, mask, mean, var))
    # two "ranks" all-reduce (sum) their moments and whiten their own shard: the same as whitening the whole batch
    shards = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    moments = [masked_moments(xi, mi) for xi, mi in shards]
    g_mean, g_var = mean_var_from_moments(*(sum(m[k] for m in moments) for k in range(3)))
    got = torch.cat([whiten_with(xi, mi, g_mean, g_var) for xi, mi in shards])
    assert close(got, whiten(x, mask), 1e-6)


# ----------------------------------------------------------------------------------------------------------- GRPO


def test_group_advantages_grpo_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 3.0])
    # group 0: mean 0.5, unbiased std sqrt(4*0.25/3) = sqrt(1/3); group 1: constant; group 2: mean 0.75, unbiased
    # std sqrt((3*0.5625 + 5.0625)/3) = 1.5
    s = math.sqrt(1 / 3)
    want = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0, 0, 0, 0, -0.5, -0.5, -0.5, 1.5]
    got = group_advantages(rewards, 4)
    assert got.shape == (12,) and close(got, want, 1e-5)
    assert torch.all(got[4:8] == 0)
    # Dr. GRPO: centred only
    dr = [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25]
    assert close(group_advantages(rewards, 4, normalize_std=False), dr)
    assert torch.equal(constant_groups(rewards, 4), torch.tensor([False, True, False]))


def test_constant_group_is_exactly_zero_and_shape_errors():
    # 0.1 * 3 / 3 != 0.1 in floating point: the constant group must still be exactly 0, not rounding / eps
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], dtype=torch.float64)
    for normalize in (True, False):
        assert torch.all(group_advantages(rewards, 3, normalize_std=normalize) == 0)
    assert torch.equal(constant_groups(rewards, 3), torch.tensor([True, True]))
    assert torch.all(group_advantages(torch.tensor([1.0, 2.0]), 1) == 0)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError):
        constant_groups(torch.ones(2, 2), 2)


# ---------------------------------------------------------------------------------------------------- policy loss

# clip_low 0.2 (ratio floor 0.8), clip_high 0.28 (ratio ceiling 1.28), dual clip 3
#   token  A   ratio  pg1    pg2    max    branch                          dual (A<0: min with 3*|A|)
#   0     +1   1.5   -1.5   -1.28  -1.28   clipped (pg2 > pg1), grad 0
#   1     +1   0.5   -0.5   -0.8   -0.5    unclipped, d/dlogp = -A*r = -0.5
#   2     -1   0.5    0.5    0.8    0.8    clipped, grad 0
#   3     -1   1.5    1.5    1.28   1.5    unclipped, d/dlogp = -A*r = 1.5
#   4     -1   5.0    5.0    1.28   5.0    unclipped                       -> 3.0, dual-clipped, grad 0
#   5     +2   1.1   -2.2   -2.2   -2.2    inside the range, d/dlogp = -2.2
#   6     (masked: junk advantage and a huge log-ratio)
ADV = [1.0, 1.0, -1.0, -1.0, -1.0, 2.0, NAN]
RATIOS = [1.5, 0.5, 0.5, 1.5, 5.0, 1.1, 1.0]
PMASK = [1, 1, 1, 1, 1, 1, 0]


def _policy_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7, -1.0]])
    logp = (old + torch.log(torch.tensor([RATIOS]))).detach()
    logp[0, 6] = 80.0  # exp(80 - (-1)) would overflow float32 without the mask
    return logp.requires_grad_(True), old, torch.tensor([ADV]), torch.tensor([PMASK], dtype=torch.float32)


def test_policy_loss_branches_counts_and_gradient():
    logp, old, adv, mask = _policy_inputs()
    loss, count, stats = policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert int(count) == 6 and count.dtype == torch.int32
    assert close(loss, -1.28 - 0.5 + 0.8 + 1.5 + 3.0 - 2.2, 1e-5)
    assert float(stats["clip_count"]) == 2 and float(stats["dual_clip_count"]) == 1
    assert close(stats["ratio_sum"], sum(RATIOS[:6]), 1e-5)
    assert close(stats["kl_old_sum"], -sum(math.log(r) for r in RATIOS[:6]), 1e-5)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    assert close(logp.grad, [[0.0, -0.5, 0.0, 1.5, 0.0, -2.2, 0.0]], 1e-5)
    assert torch.isfinite(logp.grad).all()


def test_policy_loss_without_dual_clip():
    logp, old, adv, mask = _policy_inputs()
    loss, count, stats = policy_loss(logp, old, adv, mask, 0.2, 0.28, None)
    assert close(loss, -1.28 - 0.5 + 0.8 + 1.5 + 5.0 - 2.2, 1e-5)
    assert float(stats["clip_count"]) == 2 and float(stats["dual_clip_count"]) == 0
    loss.backward()
    assert close(logp.grad, [[0.0, -0.5, 0.0, 1.5, 5.0, -2.2, 0.0]], 1e-5)
    with pytest.raises(ValueError):
        policy_loss(logp, old, adv, mask, 0.2, 0.28, 0.5)


def test_policy_loss_on_policy_ratio_is_exactly_one():
    torch.manual_seed(2)
    logp = torch.randn(2, 5).requires_grad_(True)
    adv = torch.randn(2, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    loss, count, stats = policy_loss(logp, logp.detach().clone(), adv, mask, 0.2, 0.2, 3.0)
    assert float(stats["clip_count"]) == 0 and float(stats["dual_clip_count"]) == 0
    assert float(stats["ratio_sum"]) == 8.0 and float(stats["kl_old_sum"]) == 0.0
    assert close(loss, -adv[mask.bool()].sum(), 1e-6)
    loss.backward()
    # on policy the gradient is -A on every masked token (d ratio / d logp = 1), 0 elsewhere
    assert torch.allclose(logp.grad, torch.where(mask.bool(), -adv, torch.zeros(())))


def test_policy_loss_weights_scale_per_token_loss():
    logp, old, adv, mask = _policy_inputs()
    w = torch.tensor([[2.0, 0.5, 1.0, 1.0, 1.0, 1.0, NAN]])
    loss, _, _ = policy_loss(logp, old, adv, mask, 0.2, 0.28, 3.0, weights=w)
    assert close(loss, 2 * -1.28 + 0.5 * -0.5 + 0.8 + 1.5 + 3.0 - 2.2, 1e-5)


# ----------------------------------------------------------------------------------------------------- value loss


def test_value_loss_clipped_and_unclipped():
    # clip 0.2:
    #   V=1.0 old=0.5 R=0.0: (V-R)^2 = 1, clip(V)=0.7 -> 0.49; max 1.0   -> 0.5   (unclipped term wins)
    #   V=1.0 old=0.5 R=2.0: (V-R)^2 = 1, clip(V)=0.7 -> 1.69; max 1.69  -> 0.845 (clipped term wins, grad 0)
    #   V=0.6 old=0.5 R=1.0: inside the clip range, 0.16                 -> 0.08
    #   masked: junk
    values = torch.tensor([[1.0, 1.0, 0.6, 50.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, NAN]])
    returns = torch.tensor([[0.0, 2.0, 1.0, NAN]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.float32)
    loss, count, stats = value_loss(values, old, returns, mask, clip=0.2)
    assert int(count) == 3 and close(loss, 0.5 + 0.845 + 0.08, 1e-6) and float(stats["clip_count"]) == 1
    loss.backward()
    # d/dV 0.5*(V-R)^2 = V - R
    assert close(values.grad, [[1.0, 0.0, -0.4, 0.0]], 1e-6)
    values.grad = None
    loss, count, stats = value_loss(values, old, returns, mask, clip=None)
    assert close(loss, 0.5 + 0.5 + 0.08, 1e-6) and float(stats["clip_count"]) == 0
    loss.backward()
    assert close(values.grad, [[1.0, -1.0, -0.4, 0.0]], 1e-6)


def test_value_clip_counts_only_clipped_tokens():
    """Values inside old +- clip are V itself in the clipped term (no rounding of old + (V - old)): nothing counts as
    clipped and the gradient is the unclipped one; the count equals verl's ``(clip(V) - R)^2 > (V - R)^2``."""
    torch.manual_seed(10)
    n, clip = 200_000, 0.5
    old = torch.randn(1, n)
    values = (old + (torch.rand(1, n) * 2 - 1) * clip * 0.999).requires_grad_()  # all inside the clip range
    returns = torch.randn(1, n) * 3
    mask = torch.ones(1, n)
    loss, _, stats = value_loss(values, old, returns, mask, clip=clip)
    assert float(stats["clip_count"]) == 0
    loss.backward()
    assert torch.equal(values.grad, (values - returns).detach())
    wide = old + torch.randn(1, n) * clip * 2  # some outside
    v_clip = torch.maximum(torch.minimum(wide, old + clip), old - clip)  # verl's clip_by_value
    want = ((v_clip - returns).square() > (wide - returns).square()).sum()
    assert float(value_loss(wide, old, returns, mask, clip=clip)[2]["clip_count"]) == float(want)


# ------------------------------------------------------------------------------------------- entropy, KL, weights


def test_sampling_logits_are_the_tempered_nucleus():
    """Probabilities 0.5, 0.3, 0.15, 0.05 at T=1: top_p=0.7 keeps the first two (0.5 before the second is <= 0.7, 0.8
    before the third is not), renormalised to 0.625 / 0.375; top_p=0.5 keeps the second too (the mass before it is
    0.5, not above); a label outside the nucleus is kept when asked; the temperature divides first."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    logits = probs.log().float()
    kept = torch.softmax(sampling_logits(logits, 1.0, 0.7), -1)
    assert close(kept, [0.625, 0.375, 0.0, 0.0], 1e-6)
    assert close(torch.softmax(sampling_logits(logits, 1.0, 0.5), -1), [0.625, 0.375, 0.0, 0.0], 1e-6)
    assert close(torch.softmax(sampling_logits(logits, 1.0, 0.4), -1), [1.0, 0.0, 0.0, 0.0], 1e-6)
    with_label = torch.softmax(sampling_logits(logits, 1.0, 0.7, keep=torch.tensor(3)), -1)
    assert close(with_label, [0.5 / 0.85, 0.3 / 0.85, 0.0, 0.05 / 0.85], 1e-6)
    tempered = probs ** (1 / 0.5)
    assert close(torch.softmax(sampling_logits(logits, 0.5), -1), tempered / tempered.sum(), 1e-6)
    assert torch.equal(sampling_logits(logits, 0.0), logits)  # greedy: the untempered logits
    # batched over [b, s, V]; the gradient reaches only the kept logits
    x = torch.randn(2, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 3))
    out = sampling_logits(x, 0.7, 0.9, keep=labels)
    logp = torch.log_softmax(out, -1).gather(-1, labels.unsqueeze(-1))
    assert torch.isfinite(logp).all()
    logp.sum().backward()
    dropped = ~torch.isfinite(out)
    assert dropped.any() and (x.grad[dropped] == 0).all() and (x.grad[~dropped] != 0).any()


def test_entropy_matches_definition_and_uniform_is_log_vocab():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 7) * 3
    p = torch.softmax(logits.double(), -1)
    assert close(entropy_from_logits(logits), -(p * p.log()).sum(-1), 1e-5)
    assert entropy_from_logits(logits).shape == (2, 3)
    assert close(entropy_from_logits(torch.full((2, 4, 50), 1.7)), torch.full((2, 4), math.log(50)), 1e-5)
    # stable for huge logits; -inf logits (masked vocabulary) contribute nothing and the gradient stays finite
    big = torch.tensor([[[1e4, 1e4, -1e4, float("-inf")]]], requires_grad=True)
    ent = entropy_from_logits(big)
    assert close(ent, [[math.log(2)]], 1e-5)
    ent.sum().backward()
    assert torch.isfinite(big.grad).all()


def test_kl_estimators():
    torch.manual_seed(4)
    logp = torch.randn(3, 5)
    ref = torch.randn(3, 5)
    lr = (logp - ref).double()
    assert close(kl_estimate(logp, ref, "k1"), lr, 1e-6)
    assert close(kl_estimate(logp, ref, "k2"), 0.5 * lr**2, 1e-6)
    k3 = kl_estimate(logp, ref, "k3")
    assert close(k3, torch.exp(-lr) - 1 + lr, 1e-5) and torch.all(k3 >= 0)
    for kind in ("k1", "k2", "k3"):
        assert torch.all(kl_estimate(logp, logp.clone(), kind) == 0)
    # k3 near 0 is non-negative (no cancellation below 0)
    assert torch.all(kl_estimate(torch.tensor([1e-7, -1e-7, 3e-4]), torch.zeros(3), "k3") >= 0)
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logp, ref, "k4")
    # verl's low-variance KL caps k3 at 10: a log-ratio of -12 gives e^12 ~ 1.6e5 uncapped
    far = kl_estimate(torch.tensor([-12.0, 0.5]), torch.zeros(2), "k3", clamp=10.0)
    assert far[0] == 10.0 and close(far[1], math.exp(-0.5) - 1 + 0.5, 1e-6)
    assert kl_estimate(torch.tensor([-12.0]), torch.zeros(1), "k3")[0] > 1e5


def test_sequence_mean_weights():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float32)
    w = sequence_mean_weights(mask)
    assert close(w, [[0, 0.5, 0.5, 0], [0.25, 0.25, 0.25, 0.25], [0, 0, 0, 0]])
    per_token = torch.tensor([[9.0, 1.0, 3.0, 9.0], [1.0, 2.0, 3.0, 6.0], [9.0, 9.0, 9.0, 9.0]])
    total, _ = masked_token_sum(w * per_token, mask)
    num_sequences = int((mask.sum(-1) > 0).sum())
    assert num_sequences == 2 and close(total / num_sequences, (2.0 + 3.0) / 2)


def test_truncated_importance_weights():
    rollout = torch.tensor([[-1.0, -2.0, -3.0, -0.5]])
    train = (rollout + torch.log(torch.tensor([[0.5, 2.0, 10.0, 1.0]]))).requires_grad_(True)
    w = truncated_importance_weights(train, rollout, cap=3.0)
    assert close(w, [[0.5, 2.0, 3.0, 1.0]], 1e-6) and not w.requires_grad
    assert float(truncated_importance_weights(torch.tensor([100.0]), torch.tensor([-100.0]), 2.0)) == 2.0
