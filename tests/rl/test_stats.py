"""An RL step's statistics (rl.stats) without a model: the critic's explained variance is undefined, not huge, when
the returns do not vary (every reward 0 leaves float32 GAE returns of ~1e-7)."""

from __future__ import annotations

import math

import torch

from evolm_nemo.rl.rollout import Rollout
from evolm_nemo.rl.stats import rollout_metrics


def _rollout(n: int) -> Rollout:
    ro = Rollout([[1, 2]] * n, [[3, 4, 5]] * n, [[-0.5, -0.5, math.nan]] * n, ["x"] * n, [False] * n, ["1"] * n)
    ro.rewards, ro.correct = [0.0] * n, [0.0] * n
    return ro


def _batches(returns: torch.Tensor, values: torch.Tensor) -> list[dict]:
    return [{"loss_mask": torch.ones_like(returns), "returns": returns, "old_values": values}]


def test_explained_variance_is_nan_when_returns_do_not_vary():
    n = 4
    old_logp = [[-0.5, -0.5, -0.1]] * n
    flat = torch.full((n, 3), 1e-7) + torch.randn(n, 3) * 1e-9  # all rewards 0: returns ~1e-7 of float32 noise
    rec = rollout_metrics(_rollout(n), old_logp, _batches(flat, torch.randn(n, 3)), values=True, rollout_s=1.0)
    assert math.isnan(rec["explained_variance"])
    returns = torch.randn(n, 3)
    rec = rollout_metrics(_rollout(n), old_logp, _batches(returns, returns * 0.5), values=True, rollout_s=1.0)
    assert 0.0 < rec["explained_variance"] <= 1.0  # the critic explains part of a varying return


def test_truncated_importance_weights_scale_the_policy_gradient_only(monkeypatch):
    """rl.tis_cap: the weights correct the policy-gradient term (as verl's TIS); the entropy bonus and a KL loss keep
    the plain per-token weights. The actor's loss is read with fixed log-probs (its weighting, not the model)."""
    from types import SimpleNamespace

    from evolm_nemo.rl import objectives

    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.5]])
    entropy = torch.tensor([[0.7, 0.2, 0.4, 0.9]])
    monkeypatch.setattr(objectives, "policy_logprobs", lambda logits, labels, rl: (logp, entropy))
    monkeypatch.setattr(objectives, "kl_estimate", lambda a, b, est, clamp: torch.full_like(a, 0.3))
    rl = SimpleNamespace(loss_agg="token_mean", ratio_eps=0.2, ratio_eps_high=None, dual_clip=None, entropy_bonus=0.1,
                         kl="loss", initial_policy_kl_penalty=0.5, kl_estimator="k3", kl_clamp=None)
    base = {"loss_mask": torch.ones(1, 4), "labels": torch.zeros(1, 4, dtype=torch.long), "old_logp": logp.clone(),
            "advantages": torch.tensor([[1.0, -1.0, 2.0, 0.5]]), "ref_logp": logp.clone()}
    plain, _, logs = objectives._actor_loss(dict(base), rl, None)
    tis, _, tis_logs = objectives._actor_loss({**base, "tis": torch.full((1, 4), 0.25)}, rl, None)
    pg = logs["loss_sum"]  # ratio 1: -sum(A) = -2.5
    assert float(pg) == -2.5 and float(tis_logs["loss_sum"]) == 0.25 * float(pg)
    others = -0.1 * float(entropy.sum()) + 0.5 * 0.3 * 4  # entropy bonus and KL loss, unweighted by TIS
    assert abs(float(plain) - (float(pg) + others)) < 1e-6 and abs(float(tis) - (0.25 * float(pg) + others)) < 1e-6


def test_the_logged_reference_kl_is_the_one_penalised(monkeypatch):
    """kl=reward puts k1 into the rewards: kl_ref logs k1 then, whatever rl.kl_estimator says (it logged k3, a number
    the run never penalised); kl=loss logs the estimator it adds to the loss."""
    from types import SimpleNamespace

    from evolm_nemo.losses.rl import kl_estimate
    from evolm_nemo.rl import objectives

    logp, ref = torch.tensor([[-1.0, -2.0, -0.5]]), torch.tensor([[-1.5, -1.0, -0.5]])
    monkeypatch.setattr(objectives, "policy_logprobs", lambda logits, labels, rl: (logp, torch.zeros_like(logp)))
    b = {"loss_mask": torch.ones(1, 3), "labels": torch.zeros(1, 3, dtype=torch.long), "old_logp": logp.clone(),
         "advantages": torch.ones(1, 3), "ref_logp": ref}
    for kl, want in (("reward", "k1"), ("loss", "k3")):
        rl = SimpleNamespace(loss_agg="token_mean", ratio_eps=0.2, ratio_eps_high=None, dual_clip=None,
                             entropy_bonus=0.0, kl=kl, initial_policy_kl_penalty=0.5, kl_estimator="k3", kl_clamp=None)
        _, _, logs = objectives._actor_loss(dict(b), rl, None)
        assert float(logs["kl_ref_sum"]) == float(kl_estimate(logp, ref, want).sum()), kl


def test_the_reward_judges_what_evaluation_keeps_of_a_response():
    """A response that answers and then makes up the next turn ("Human: ... Assistant: The answer is 4."): the reward
    judges the text before the evaluation's stop strings -- what an evaluation of the model keeps -- unless
    ``rl.reward_cut_at_stop=false`` (verl 0.2 judged the whole response)."""
    from evolm_nemo.rl.rollout import verifiable_rewards

    text = "2 x 75 = 150. The answer is 150.\nHuman: What is 2+2?\nAssistant: The answer is 4."
    ro = Rollout([[1]] * 2, [[3]] * 2, [[-0.5]] * 2, [text, "The answer is 4."], [False] * 2, ["150", "150"])
    assert verifiable_rewards(ro, "gsm8k_platinum", "strict") == [1.0, 0.0]
    assert verifiable_rewards(ro, "gsm8k_platinum", "strict", cut=False) == [0.0, 0.0]
    assert verifiable_rewards(ro, "gsm8k_platinum", "evolm") == [1.0, 0.0]


def test_a_failure_on_tensor_parallel_rank_0_stops_its_peers_too(tmp_path):
    """on_tp_rank0 handed on only a ConfigError: any other failure on rank 0 left the other ranks of the model waiting
    in the broadcast until the process-group timeout (30 minutes, then an unrelated traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO, free_port, subprocess_env

    script = Path(__file__).with_name("_tp_rank0.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(script), str(tmp_path)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "BrokenPipeError: the reward pool went away"
    assert (tmp_path / "rank1.txt").read_text() == ("RuntimeError: tensor-parallel rank 0 failed while computing "
                                                    "rewards: BrokenPipeError: the reward pool went away")


def test_the_divergence_guard_covers_the_whole_actor_objective():
    """The loop stops before recording or saving an iteration whose finite_keys are not finite: the logged `loss` is
    the policy term only, so the entropy bonus and the KL loss (k2, or k3 without a clamp, can overflow) are guarded
    by their own metrics -- also when no grad norm is checked (optim.clip_grad=0)."""
    from types import SimpleNamespace

    from evolm_nemo.stages.rl import RLStage

    def keys(ref, clip):
        return RLStage.finite_keys.fget(SimpleNamespace(cfg=SimpleNamespace(optim=SimpleNamespace(clip_grad=clip)),
                                                        ref=ref))

    assert {"loss", "value_loss", "entropy", "kl_ref"} <= set(keys(object(), 0.0))
    assert "kl_ref" not in keys(None, 1.0) and "actor_grad_norm" in keys(None, 1.0)
