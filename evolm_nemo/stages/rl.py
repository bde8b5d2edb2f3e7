"""PPO and GRPO (``stage=ppo`` / ``stage=grpo``): the RL loop (``evolm_nemo.rl.loop``) with its own outer loop over
rollouts, reusing the engine's step and checkpoints. This module checks the recipe and plans the iterations."""

from __future__ import annotations

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.tasks import SUITE_KIND

CHOICES = {"kl": ("off", "reward", "loss"), "kl_estimator": ("k1", "k2", "k3"),
           "loss_agg": ("token_mean", "seq_mean"), "reward_scoring": ("strict", "evolm")}


def plan_iters(cfg: RootConfig, dp: int) -> int:
    t, r, p = cfg.train, cfg.rl, cfg.parallel
    for key, options in CHOICES.items():
        if getattr(r, key) not in options:
            raise ConfigError(f"rl.{key}", f"must be one of {', '.join(options)}; got {getattr(r, key)!r}")
    if SUITE_KIND.get(r.reward_suite) != "math":
        raise ConfigError("rl.reward_suite", f"the verifiable reward uses a math suite's rule (gsm8k_platinum, math); "
                                             f"got {r.reward_suite!r}")
    if t.tokens is not None:
        raise ConfigError("train.tokens", f"stage={cfg.stage} trains by train.iters or train.epochs over the prompts; "
                                          "set train.tokens=null")
    if t.epochs is None and t.iters is None:
        raise ConfigError("train.iters", f"stage={cfg.stage} needs train.iters (rollout steps) or train.epochs")
    for key in ("iters", "epochs"):
        if getattr(t, key) is not None and getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}", f"must be > 0, got {getattr(t, key)}")
    if not t.init_from:
        raise ConfigError("train.init_from", f"stage={cfg.stage} starts from a checkpoint (an SFT run)")
    from evolm_nemo.checkpoint import io as ckpt
    from evolm_nemo.rl import reward

    try:
        actor_tokenizer = ckpt.read_meta(ckpt.resolve(t.init_from)).get("tokenizer")
    except ckpt.CheckpointError as exc:
        raise ConfigError("train.init_from", str(exc)) from None
    reward.check(cfg, actor_tokenizer)
    if p.pp != 1:
        raise ConfigError("parallel.pp", "RL rollouts run megatron's inference engine, which needs pp=1; use tp/dp")
    for key in ("prompts_per_step", "samples_per_prompt", "ppo_epochs", "mini_batches", "rollout_micro_batch_size",
                "max_prompt_tokens", "max_response_tokens"):
        if getattr(r, key) < 1:
            raise ConfigError(f"rl.{key}", f"must be >= 1, got {getattr(r, key)}")
    if cfg.stage == "grpo" and r.samples_per_prompt < 2:
        raise ConfigError("rl.samples_per_prompt", "GRPO compares samples of one prompt: it needs >= 2")
    if r.prompts_per_step % dp:
        raise ConfigError("rl.prompts_per_step", f"{r.prompts_per_step} prompts do not split over {dp} data-parallel "
                                                 "ranks")
    per_rank = r.prompts_per_step // dp * r.samples_per_prompt
    if per_rank % (r.mini_batches * p.micro_batch_size):
        raise ConfigError("parallel.micro_batch_size", f"each rank trains on {per_rank} sequences per step: they must "
                                                       f"split into rl.mini_batches={r.mini_batches} x "
                                                       f"micro_batch_size={p.micro_batch_size}")
    if not r.ratio_eps > 0 or (r.ratio_eps_high is not None and not r.ratio_eps_high > 0):
        raise ConfigError("rl.ratio_eps", "clip ranges must be > 0")
    if r.dual_clip is not None and not r.dual_clip > 1:
        raise ConfigError("rl.dual_clip", f"must be > 1 or null, got {r.dual_clip}")
    if r.value_clip is not None and not r.value_clip > 0:
        raise ConfigError("rl.value_clip", f"must be > 0 or null, got {r.value_clip}")
    if r.tis_cap is not None and not r.tis_cap > 0:
        raise ConfigError("rl.tis_cap", f"must be > 0 or null, got {r.tis_cap}")
    if r.kl != "off" and r.initial_policy_kl_penalty <= 0:
        raise ConfigError("rl.initial_policy_kl_penalty", f"rl.kl={r.kl} needs a positive KL coefficient")
    if r.critic_init is not None and cfg.stage == "ppo":
        from pathlib import Path

        if not Path(r.critic_init).exists():
            raise ConfigError("rl.critic_init", f"no checkpoint at {r.critic_init}")
    if r.val_interval and not r.val_data:
        raise ConfigError("rl.val_data", "rl.val_interval needs a validation JSONL {id, prompt, gold_answer}")
    if r.val_interval:
        from evolm_nemo.rl.data import read_prompts

        read_prompts([r.val_data], "rl.val_data")  # exists and is well-formed, before anything starts
    from evolm_nemo.rl.data import usable_prompts

    prompts, skipped = usable_prompts(cfg)
    if len(prompts) < r.prompts_per_step:
        raise ConfigError("rl.prompts_per_step", f"{r.prompts_per_step} is more than the {len(prompts)} usable prompts "
                                                 f"({skipped} longer than rl.max_prompt_tokens)")
    iters = None
    if t.epochs is not None:
        iters = len(prompts) * t.epochs // r.prompts_per_step
    if t.iters is not None:
        iters = t.iters if iters is None else min(iters, t.iters)
    return iters


def run(cfg: RootConfig, plan):
    from evolm_nemo.rl.loop import rl_fit

    return rl_fit(cfg, plan)
