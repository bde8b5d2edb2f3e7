"""PPO and GRPO (``stage=ppo`` / ``stage=grpo``) through the one run loop: an iteration is a rollout from the live
actor (megatron-core's inference engine), rewards from the shared answer checker (and/or a reward model), old
log-probs / values (forward only), advantages (GAE or group-relative), then ``rl.ppo_epochs`` x ``rl.mini_batches``
engine steps of the actor (and critic).

Roles, all megatron-core models on the same ranks (TP/DP; pp = 1 because the inference engine needs it): the actor
(from ``train.init_from``), the critic (PPO: the same backbone, or ``rl.critic_init``, with a fresh scalar head), the
reference (frozen, built only when a KL term is on), the reward model (frozen, ``rl.reward=rm|sum``). The trained
roles -- actor and critic, each with its optimizer and scheduler -- are saved as one unit by the loop: the critic under
``critic/`` first, then the actor under ``checkpoints/`` (its commit is the commit of the pair), so ``export-hf
src=<run>`` exports the actor and ``export-hf src=<run>/critic`` the critic.

Rollout sampling is keyed by (``train.seed``, iteration, the sequence's place in the step's global batch) with the
continuous engine -- the same samples whatever the data-parallel size -- and by (``train.seed``, iteration,
data-parallel rank) with the static one, so a resumed run rolls out exactly what the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from evolm_nemo.answers import judge
from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RLConfig, RootConfig
from evolm_nemo.config.validate import check_shape
from evolm_nemo.data.packing import best_fit, by_count, by_token_budget, row_multiple
from evolm_nemo.data.sft_synthetic import RL_EXAMPLES
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.generation.continuous import ContinuousGenerator
from evolm_nemo.generation.engine import Generator
from evolm_nemo.losses.rl import constant_groups, gae, group_advantages, truncated_importance_weights, whiten_with
from evolm_nemo.model.build import build_model, with_precision
from evolm_nemo.model.heads import build_value_model, load_backbone
from evolm_nemo.rl.data import PromptSchedule, fit_prompts, prompt_files, read_prompts, usable_prompts
from evolm_nemo.rl.objectives import (actor_forward_step, collate, critic_forward_step, logprob_forward_step,
                                     per_token)
from evolm_nemo.rl.reward import (RewardModelScorer, check as check_reward, check_reward_model_used,
                                  combine as combine_rewards)
from evolm_nemo.rl.reward_fn import RewardFunction, rewards as reward_fn_rewards
from evolm_nemo.rl.rollout import Rollout, RolloutLog, generate, judged_text, verifiable_rewards
from evolm_nemo.rl.stats import dp_allreduce, global_moments, on_tp_rank0, rollout_metrics
from evolm_nemo.stages import check_budget_keys, kind, rl_split
from evolm_nemo.stages.base import Stage, check_layout, file_fingerprint
from evolm_nemo.tasks import SUITE_KIND
from evolm_nemo.train.engine import build_training_model, train_step
from evolm_nemo.train.forward import forward_collect, value_forward_step
from evolm_nemo.train.loop import MAIN, Role, Start

CRITIC = "critic"  # <run>/critic: the PPO critic's checkpoints, namesakes of the actor's
ACTOR_KEYS = ("entropy_sum", "kl_ref_sum", "response_tokens", "clip_count", "dual_clip_count", "ratio_sum",
              "kl_old_sum")
CRITIC_KEYS = ("value_clip_count",)

CHOICES = {"kl": ("off", "reward", "loss"), "kl_estimator": ("k1", "k2", "k3"),
           "loss_agg": ("token_mean", "seq_mean"), "reward_scoring": ("strict", "evolm")}


# keys only the other algorithm reads, and why: a value other than the default is refused, not silently ignored
PPO_ONLY = {k: "stage=grpo has no critic (its baseline is the group's mean reward)" for k in
            ("critic_lr", "value_clip")} | {k: "stage=grpo has no GAE (each sample's advantage is its reward against "
                                              "its group's)" for k in ("discount_factor", "gae_lambda",
                                                                      "whiten_advantages")}
GRPO_ONLY = {"grpo_normalize_std": "stage=ppo has no groups (its advantages are GAE's)"}
RL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RLConfig)}


def plan_iters(cfg: RootConfig, dp: int) -> int:
    t, r, p = cfg.train, cfg.rl, cfg.parallel
    for key, options in CHOICES.items():
        if getattr(r, key) not in options:
            raise ConfigError(f"rl.{key}", f"must be one of {', '.join(options)}; got {getattr(r, key)!r}")
    if SUITE_KIND.get(r.reward_suite) != "math":
        raise ConfigError("rl.reward_suite", f"the verifiable reward uses a math suite's rule (gsm8k_platinum, math); "
                                             f"got {r.reward_suite!r}")
    check_budget_keys(cfg)
    check_reward(cfg, ckpt.parent_tokenizer(t.init_from, key="train.init_from"))
    if p.pp != 1:
        raise ConfigError("parallel.pp", "RL rollouts run megatron's inference engine, which needs pp=1; use tp/dp")
    for key in ("prompts_per_step", "samples_per_prompt", "ppo_epochs", "mini_batches", "rollout_micro_batch_size",
                "max_prompt_tokens", "max_response_tokens"):
        if getattr(r, key) < 1:
            raise ConfigError(f"rl.{key}", f"must be >= 1, got {getattr(r, key)}")
    if r.rollout_engine not in ("continuous", "static"):
        raise ConfigError("rl.rollout_engine", f"must be continuous or static, got {r.rollout_engine!r}")
    if cfg.stage == "grpo" and r.samples_per_prompt < 2:
        raise ConfigError("rl.samples_per_prompt", "GRPO compares samples of one prompt: it needs >= 2")
    if (split := rl_split(cfg, dp)) is not None and split[0] == "rl.prompts_per_step":
        raise ConfigError(*split)
    check_layout(cfg, min(cfg.model.seq_length, r.max_prompt_tokens + r.max_response_tokens), "sequence")
    if split is not None:
        raise ConfigError(*split)
    check_ranges(cfg)
    if r.critic_init is not None and cfg.stage == "ppo":
        check_critic_init(cfg)
    if r.val_interval and not r.val_data:
        raise ConfigError("rl.val_data", "rl.val_interval needs a validation JSONL {id, prompt, gold_answer}")
    if r.val_interval:  # exists, is well-formed and has prompts that fit, before anything starts
        val, too_long = fit_prompts(cfg, read_prompts([r.val_data], "rl.val_data"))
        if not len(val):
            raise ConfigError("rl.val_data", f"none of its {too_long} prompts fits rl.max_prompt_tokens="
                                             f"{r.max_prompt_tokens} (and model.seq_length)")
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


def check_ranges(cfg: RootConfig) -> None:
    """The ``rl.*`` values that must lie in a range (clip ranges, discounts, sampling, rates, KL): what the trainer
    and ``evolm suite plan`` refuse alike, from the recipe alone."""
    r = cfg.rl
    if not r.ratio_eps > 0 or (r.ratio_eps_high is not None and not r.ratio_eps_high > 0):
        raise ConfigError("rl.ratio_eps", "clip ranges must be > 0")
    if not r.ratio_eps < 1:
        raise ConfigError("rl.ratio_eps", f"must be < 1 (the low clip 1 - eps would be <= 0: no clip), got "
                                          f"{r.ratio_eps}")
    if not r.val_interval >= 0:
        raise ConfigError("rl.val_interval", f"must be >= 0 (0: off), got {r.val_interval}")
    if r.val_interval and r.val_size < 1:
        raise ConfigError("rl.val_size", f"must be >= 1 with rl.val_interval set, got {r.val_size}")
    if r.val_data and not r.val_interval:  # it would be silently ignored: no validation runs with interval 0
        raise ConfigError("rl.val_data", "is set, but rl.val_interval=0 turns validation off, so it would not be read; "
                                         "set rl.val_interval=N (greedy validation every N iterations and at the end) "
                                         "or leave rl.val_data null")
    check_reward_model_used(cfg)
    if any(not isinstance(x, str) or not x for x in r.stop_strings):
        raise ConfigError("rl.stop_strings", f"each must be a non-empty string (an empty one ends every response "
                                             f"before its first token), got {list(r.stop_strings)!r}")
    # settings another algorithm reads: refused rather than silently ignored
    if cfg.stage == "ppo" and r.dynamic_sampling:
        raise ConfigError("rl.dynamic_sampling", "drops GRPO groups whose samples' rewards are all equal; stage=ppo "
                                                 "has no groups: use stage=grpo or leave it false")
    if cfg.stage == "grpo" and r.critic_init is not None:
        raise ConfigError("rl.critic_init", "stage=grpo has no critic (its baseline is the group's mean reward); "
                                            "use stage=ppo or leave it null")
    unread = PPO_ONLY if cfg.stage == "grpo" else GRPO_ONLY
    for key, why in unread.items():
        default = RL_DEFAULTS[key]
        if getattr(r, key) != default:
            raise ConfigError(f"rl.{key}", f"{why}, so {getattr(r, key)} would be ignored: use stage="
                                           f"{'ppo' if cfg.stage == 'grpo' else 'grpo'} or leave it at {default}")
    if r.dual_clip is not None and not r.dual_clip > 1:
        raise ConfigError("rl.dual_clip", f"must be > 1 or null, got {r.dual_clip}")
    if r.value_clip is not None and not r.value_clip > 0:
        raise ConfigError("rl.value_clip", f"must be > 0 or null, got {r.value_clip}")
    if r.tis_cap is not None and not r.tis_cap > 0:
        raise ConfigError("rl.tis_cap", f"must be > 0 or null, got {r.tis_cap}")
    for key in ("discount_factor", "gae_lambda"):
        if not 0.0 <= getattr(r, key) <= 1.0:
            raise ConfigError(f"rl.{key}", f"must be in [0, 1], got {getattr(r, key)}")
    if not 0.0 < r.top_p <= 1.0:
        raise ConfigError("rl.top_p", f"must be in (0, 1], got {r.top_p}")
    if not r.temperature >= 0:
        raise ConfigError("rl.temperature", f"must be >= 0 (0: greedy rollouts), got {r.temperature}")
    if not r.critic_lr > 0:
        raise ConfigError("rl.critic_lr", f"must be > 0, got {r.critic_lr}")
    # written ``not x >= 0``: a NaN fails every comparison, so ``x < 0`` would let it through
    if not r.entropy_bonus >= 0:
        raise ConfigError("rl.entropy_bonus", f"must be >= 0 (a negative bonus rewards certainty), got "
                                              f"{r.entropy_bonus}")
    if r.kl_clamp is not None and not r.kl_clamp > 0:
        raise ConfigError("rl.kl_clamp", f"must be > 0 or null, got {r.kl_clamp}")
    if not r.initial_policy_kl_penalty >= 0:
        raise ConfigError("rl.initial_policy_kl_penalty", f"must be >= 0 (a negative coefficient rewards "
                                                          "drifting from the initial policy), got "
                                                          f"{r.initial_policy_kl_penalty}")
    if r.kl != "off" and not r.initial_policy_kl_penalty > 0:
        raise ConfigError("rl.initial_policy_kl_penalty", f"rl.kl={r.kl} needs a positive KL coefficient")
    if r.kl == "off" and r.initial_policy_kl_penalty:  # EvoLM's verl scripts set a coefficient that never acted
        raise ConfigError("rl.initial_policy_kl_penalty", f"is {r.initial_policy_kl_penalty}, but rl.kl=off (the "
                                                          "default) applies no KL term, so it would be ignored: set "
                                                          "rl.kl=reward (PPO: k1 in the rewards) or rl.kl=loss, or "
                                                          "leave it 0")
    if cfg.stage == "grpo" and r.kl == "reward":
        raise ConfigError("rl.kl", "kl=reward puts the KL penalty into PPO's per-token rewards (GAE); GRPO's "
                                   "advantages come from each sample's reward alone, so it would never act: use "
                                   "rl.kl=loss (verl's use_kl_loss) or off")
    if cfg.stage == "grpo" and r.temperature == 0:
        raise ConfigError("rl.temperature", "GRPO compares the samples of a prompt; greedy rollouts (temperature 0) "
                                            "make them identical, so every advantage is 0: use a temperature > 0")


def check_critic_init(cfg: RootConfig) -> None:
    """``rl.critic_init`` is a complete checkpoint (a run directory or one of its ``iter_*``) of the actor's model
    shape: its backbone starts the critic. Read from its evolm.json only, before anything is built."""
    path = cfg.rl.critic_init
    if not Path(path).exists():
        raise ConfigError("rl.critic_init", f"no checkpoint at {path}")
    try:
        meta = ckpt.read_meta(ckpt.resolve(path))
    except (ckpt.CheckpointError, OSError, ValueError) as exc:
        raise ConfigError("rl.critic_init", f"{exc}; it must be a checkpoint (a training run or one of its iter_* "
                                            "directories) whose backbone starts the critic") from None
    check_shape(cfg.model, meta, lambda ours, theirs, name: f"{ours} differs from {theirs} in rl.critic_init={path} "
                                                           f"(model {name}); the critic shares the actor's shape")


def rollout_seed(seed: int, iteration: int, *more: int) -> int:
    """The sampling seed of an iteration's rollout (< 2**31): numpy's SeedSequence of (``train.seed``, iteration,
    ``more``), so no two iterations (or replicas) share one."""
    return int(np.random.SeedSequence([seed, iteration, *more]).generate_state(1)[0]) & 0x7FFFFFFF


def data_identity(cfg: RootConfig) -> dict:
    """What defines an RL run's data and batch (a resume may not change it): the prompt files' content, which of
    them fit, the prompts and samples per step, the updates per step (the schedules' length) and the order's seed."""
    r = cfg.rl
    return {"data.paths": [file_fingerprint(f) for f in prompt_files(cfg)], "model.seq_length": cfg.model.seq_length,
            **{f"rl.{k}": getattr(r, k) for k in ("prompts_per_step", "samples_per_prompt", "ppo_epochs",
                                                   "mini_batches", "max_prompt_tokens")},
            "train.seed": cfg.train.seed}


def checkpoint_dirs(cfg: RootConfig) -> tuple[str, ...]:
    """The run's checkpoint roots, actor first: a PPO checkpoint is the actor + critic pair."""
    return (MAIN, CRITIC) if kind(cfg.stage).critic else (MAIN,)


# what the critic's update reads of a microbatch (a packed row's bounds included)
CRITIC_INPUTS = ("tokens", "labels", "position_ids", "loss_mask", "returns", "old_values", "segment", "cu_seqlens",
                 "max_seqlen", "last")


SOURCE_KEYS = {"reference": "train.init_from", "reward_model": "rl.reward_model"}  # a frozen role -> its key


def check_no_role_added(state: dict, sources: dict) -> None:
    """A resumed run (``state``: its checkpoint's) keeps the frozen roles it started with: a reference or reward
    model in ``sources`` that its ``rl_sources`` lack would change the run mid-way (``rl.reward=sum`` takes an RM
    when one is named) -- one line naming the key. Checkpoints from before ``rl_sources`` are not compared."""
    if "rl_sources" not in state:
        return
    for role in sources:
        if not (state["rl_sources"] or {}).get(role):
            key = SOURCE_KEYS[role]
            raise ConfigError(key, f"this run started without a {role.replace('_', ' ')}; a resume keeps the run as it "
                                   f"started: unset {key}, or go on as a new run from its checkpoint (train.init_from "
                                   "with a new run.out_dir)")


class RLStage(Stage):
    """One RL run: its prompts, roles and step. ``step(iteration)`` does one rollout + update and returns its
    record."""

    history_key = "reward_mean"

    def __init__(self, cfg: RootConfig, plan, rt):
        from megatron.core import parallel_state

        self.cfg, self.plan, self.rt, self.rl = cfg, plan, rt, cfg.rl
        r = cfg.rl
        self.grpo = cfg.stage == "grpo"
        self.prompts, self.skipped = usable_prompts(cfg)
        self.val = None
        if r.val_data and r.val_interval:  # the first rl.val_size prompts that fit, as for training
            val, _ = fit_prompts(cfg, read_prompts([r.val_data], "rl.val_data"))
            self.val = val.subset(list(range(min(r.val_size, len(val)))))
            trained = set(self.prompts.prompts)
            both = sum(p in trained for p in self.val.prompts)
            if both and rt.is_main:  # verl does not look either; a user comparing val_accuracy should know
                print(f"[evolm] warning: rl.val_data: {both} of its {len(self.val.prompts)} validation prompts are "
                      "training prompts too (data.paths): val_accuracy measures them as trained", file=sys.stderr,
                      flush=True)
        self.dp, self.dp_rank = plan.dp, parallel_state.get_data_parallel_rank()
        self.schedule = PromptSchedule(len(self.prompts), r.prompts_per_step, cfg.train.seed, self.dp_rank, self.dp)
        self.steps_per_iter = r.ppo_epochs * r.mini_batches
        self.tokenizer = ckpt.parent_tokenizer(cfg.train.init_from) or cfg.data.tokenizer
        self.tok = load_tokenizer(self.tokenizer, key="train.init_from")
        self.eos = int(self.tok.eos_token_id)
        self.rollout_log = None
        # the frozen roles' checkpoints (role -> iter_* dir), resolved at the run's first start and kept in its
        # checkpoints: a parent run (or an RM run) that saved again since is not a new reference or reward mid-run
        self.sources: dict[str, str] = {}
        self.packing, self.budget = cfg.train.packing, cfg.parallel.max_tokens_per_microbatch
        self.multiple = row_multiple(cfg.parallel)

    # ------------------------------------------------------------------------------------------- roles
    def build(self, rt) -> list[Role]:
        """The actor (and PPO's critic) with their optimizers and schedulers over every engine step of the run; the
        frozen reference (KL on) and reward model (rl.reward != verifiable); the actor's inference engine."""
        cfg, r, steps = self.cfg, self.rl, self.plan.iters * self.steps_per_iter
        model, optimizer, make = build_training_model(cfg, rt)
        self.actor = Role(model, optimizer, make(steps), make, meta={"role": "actor"})
        self.critic = None
        if kind(cfg.stage).critic:
            o = cfg.optim
            ccfg = dataclasses.replace(cfg, optim=dataclasses.replace(o, lr=r.critic_lr,
                                                                       min_lr=min(o.min_lr, r.critic_lr)))
            model, optimizer, make = build_training_model(ccfg, rt, build_value_model)
            self.critic = Role(model, optimizer, make(steps), make, dir=CRITIC, meta={"head": "value",
                                                                                      "role": "critic"})
        self.ref = None
        if r.kl != "off":  # its weights in prepare(): the checkpoint this run started from, also after a resume
            self.ref = with_precision(build_model(cfg.model, cfg.parallel, rt.dtype), rt.dtype)  # as the actor
            self.sources["reference"] = str(ckpt.resolve(cfg.train.init_from))
        self.rm = None
        if r.reward in ("rm", "sum") and r.reward_model:  # the reward role: a frozen value-head model (rl/reward.py)
            self.rm = RewardModelScorer(cfg, rt)
            self.sources["reward_model"] = str(self.rm.path)
        self.reward_fn = None
        if r.reward in ("custom", "sum") and r.reward_fn:  # a user function in helper processes (rl/reward_fn.py)
            self.reward_fn = RewardFunction(r.reward_fn, r.reward_fn_timeout, r.reward_fn_workers)
        max_seq = min(cfg.model.seq_length, r.max_prompt_tokens + r.max_response_tokens)
        engine = ContinuousGenerator if r.rollout_engine == "continuous" else Generator
        self.generator = engine(self.actor.model, self.tok, max_seq=max_seq, max_batch=r.rollout_micro_batch_size)
        return [self.actor] + ([self.critic] if self.critic is not None else [])

    def start(self, roles, layout) -> Start:
        """The actor from ``train.init_from`` (as every stage); the critic's backbone from ``rl.critic_init`` (or the
        same), with a fresh scalar head."""
        start = super().start(roles, layout)
        if self.critic is not None:
            load_backbone(self.rl.critic_init or self.cfg.train.init_from, [self.critic.model])
            self.critic.optimizer.reload_model_params()
        return start

    def restore(self, start, state):
        """A resumed run keeps the reference and reward model it started with (``rl_sources`` of its checkpoint)."""
        check_no_role_added(state, self.sources)
        recorded = state.get("rl_sources") or {}
        for role, now in list(self.sources.items()):
            kept = recorded.get(role)
            if not kept or kept == now:
                continue
            if not ckpt.is_complete(Path(kept)):
                raise ConfigError(SOURCE_KEYS[role], f"this run's {role.replace('_', ' ')}, {kept}, is gone or incomplete "
                                              f"(the latest is now {now}); restore it, or start a new run")
            if self.rt.is_main:
                print(f"[evolm] {role.replace('_', ' ')}: {kept}, the one this run started with (the latest is now "
                      f"{now})", flush=True)
            self.sources[role] = kept

    def prepare(self, model, rt, start, out_dir):
        if self.ref is not None:
            ckpt.load_weights(self.sources["reference"], [self.ref])
            self.ref.eval()
        if self.rm is not None:
            self.rm.load(self.sources["reward_model"])
        if self.rl.save_rollouts:
            self.rollout_log = RolloutLog(Path(out_dir) / "rollouts.jsonl", start, self.dp_rank)

    # ------------------------------------------------------------------------------------------- one iteration
    def rollout(self, iteration: int) -> Rollout:
        idx = self.schedule.indices(iteration)
        n = self.rl.samples_per_prompt
        if isinstance(self.generator, ContinuousGenerator):
            # keyed by the sequence's place in the step's global batch: the same samples whatever the data-parallel
            # size (a resume on another number of GPUs included)
            seed, first = rollout_seed(self.cfg.train.seed, iteration), self.dp_rank * len(idx) * n
        else:  # the static engine seeds a call: each replica its own
            seed, first = rollout_seed(self.cfg.train.seed, iteration, self.dp_rank), None
        ro = generate(self.generator, [self.prompts.prompts[i] for i in idx], [self.prompts.gold[i] for i in idx],
                      n, self.rl, self.eos, seed, first)
        ro.prompts = [self.prompts.prompts[i] for i in idx for _ in range(self.rl.samples_per_prompt)]
        ro.rows = [self.prompts.rows[i] for i in idx for _ in range(self.rl.samples_per_prompt)]
        return ro

    def _reward_fn(self, ro: Rollout, iteration: int) -> tuple[list, list, dict]:
        """The user reward function's scores of this rank's responses, its per-response results and its part of the
        step's record (over the global batch)."""
        n, suite = self.rl.samples_per_prompt, self.rl.reward_suite
        # the prompt's row as read; unless it has them, `suite` (rl.reward_suite) and `sample` (which of the prompt's n)
        rows = [{"suite": suite, "sample": k % n, **row} for k, row in enumerate(ro.rows)]
        return reward_fn_rewards(self.reward_fn, self.rl.reward_fn_errors, ro.prompts, ro.texts, rows, iteration)

    def _layout(self, ro: Rollout) -> list[list[list[int]]]:
        """The update's mini-batches (``rl.mini_batches`` consecutive slices of this rank's sequences), each as its
        microbatches (lists of sequence indices): ``micro_batch_size`` sequences each, or by a token budget
        (``parallel.max_tokens_per_microbatch``), or packed rows (``train.packing``: best-fit into rows of
        ``model.seq_length`` tokens, or the budget). Every layout holds the same sequences."""
        n = len(ro)
        per = n // self.rl.mini_batches
        tokens = [len(ro.prompt_ids[k]) + len(ro.response_ids[k]) - 1 for k in range(n)]
        minis = []
        for m in range(self.rl.mini_batches):
            rows = list(range(m * per, (m + 1) * per))
            lengths = [tokens[k] for k in rows]
            if self.packing:
                idx = best_fit(lengths, self.budget or self.cfg.model.seq_length)
            elif self.budget:
                idx = by_token_budget(lengths, self.budget)
            else:
                idx = by_count(len(rows), self.cfg.parallel.micro_batch_size)
            minis.append([[rows[i] for i in g] for g in idx])
        return minis

    def _microbatches(self, ro: Rollout, groups: list[list[int]], extra: dict[str, list[list[float]]]) -> list[dict]:
        seqs = [(ro.prompt_ids[k] + ro.response_ids[k], len(ro.prompt_ids[k])) for k in range(len(ro))]
        out = []
        for rows in groups:
            picked = [seqs[k] for k in rows]
            out.append(collate(picked, {key: [v[k] for k in rows] for key, v in extra.items()}, pad_id=self.eos,
                               packed_length=sum(len(ids) - 1 for ids, _ in picked) if self.packing else None,
                               multiple=self.multiple))
        return out

    def _per_token(self, outputs: list[torch.Tensor], batches: list[dict], groups: list[list[int]], n: int) -> list:
        """Scatter microbatch outputs back to per-sequence lists over response positions."""
        rows: list = [None] * n
        for out, b, g in zip(outputs, batches, groups):
            for k, values in zip(g, per_token(out, b)):
                rows[k] = values
        return rows

    def _advantages(self, ro: Rollout, rewards: list, values: list) -> tuple[list, list]:
        """GAE per sequence (on one padded batch of every sequence, whatever the update's layout, so that no
        recursion crosses from one packed sequence into the next), whitened over the global batch when asked."""
        r, n = self.rl, len(ro)
        seqs = [(ro.prompt_ids[k] + ro.response_ids[k], len(ro.prompt_ids[k])) for k in range(n)]
        b = collate(seqs, {"rewards": rewards, "old_values": values}, pad_id=self.eos)
        adv, ret = gae(b["rewards"], b["old_values"], b["loss_mask"], r.discount_factor, r.gae_lambda)
        if r.whiten_advantages:
            mean, var = global_moments(adv.flatten(), b["loss_mask"].flatten())
            adv = whiten_with(adv, b["loss_mask"], mean, var)
        return per_token(adv, b), per_token(ret, b)

    def step(self, iteration: int) -> dict:
        """Rollout -> reward -> old log-probs / values -> advantages -> the actor's (and critic's) engine updates."""
        r, rt = self.rl, self.rt
        rows = 1 if self.packing else self.cfg.parallel.micro_batch_size
        t0 = time.perf_counter()
        ro = self.rollout(iteration)
        t1 = time.perf_counter()
        ro.correct = on_tp_rank0(lambda: verifiable_rewards(ro, r.reward_suite, r.reward_scoring,
                                                                        r.reward_cut_at_stop))
        ro.rm_scores = self.rm.score(ro.prompt_ids, ro.response_ids, self.eos) if self.rm is not None else None
        fn_record = {}
        if self.reward_fn is not None:
            ro.fn_scores, ro.fn_results, fn_record = on_tp_rank0(lambda: self._reward_fn(ro, iteration))
        ro.rewards = combine_rewards(ro.correct, ro.rm_scores, self.cfg, ro.fn_scores)
        t2 = time.perf_counter()
        n = len(ro)
        minis = self._layout(ro)
        groups = [g for mini in minis for g in mini]
        base = self._microbatches(ro, groups, {})
        logp_step = partial(logprob_forward_step, r)  # of the distribution the rollout sampled from
        old_logp = self._per_token(forward_collect(self.actor.model, base, logp_step, rows, rt), base, groups, n)
        ref_logp = (self._per_token(forward_collect(self.ref, base, logp_step, rows, rt), base, groups, n)
                    if self.ref is not None else None)
        # token-level rewards: the verifiable reward on the last response token, minus k1 KL when kl=reward
        rewards = []
        for k in range(n):
            rw = [0.0] * len(ro.response_ids[k])
            rw[-1] = ro.rewards[k]
            if r.kl == "reward":
                rw = [x - r.initial_policy_kl_penalty * (a - b) for x, a, b in zip(rw, old_logp[k], ref_logp[k])]
            rewards.append(rw)
        extra = {"old_logp": old_logp}
        if r.tis_cap is not None:  # the engine reports no log p for a final EOS: weight 1 there
            train = torch.tensor([x for o in old_logp for x in o])
            engine = torch.tensor([x for e in ro.engine_logp for x in e])
            weights = truncated_importance_weights(train, torch.where(engine.isnan(), train, engine), r.tis_cap)
            extra["tis"] = [w.tolist() for w in weights.split([len(o) for o in old_logp])]
        if ref_logp is not None:
            extra["ref_logp"] = ref_logp
        keep = [1.0] * n
        dropped = 0
        if self.grpo:
            g = torch.tensor(ro.rewards, dtype=torch.float64)
            adv = group_advantages(g, r.samples_per_prompt, normalize_std=r.grpo_normalize_std)
            if r.dynamic_sampling:
                const = constant_groups(g, r.samples_per_prompt).repeat_interleave(r.samples_per_prompt)
                keep = [0.0 if c else 1.0 for c in const.tolist()]
                dropped = int(const.sum()) // r.samples_per_prompt
            extra["advantages"] = [[float(adv[k]) * keep[k]] * len(ro.response_ids[k]) for k in range(n)]
            values = None
        else:
            values = self._per_token(forward_collect(self.critic.model, base, value_forward_step, rows, rt), base,
                                     groups, n)
            extra["old_values"] = values
            extra["advantages"], extra["returns"] = self._advantages(ro, rewards, values)
        if dropped:  # a dropped group's tokens leave the loss and its count
            extra["keep"] = [[keep[k]] * len(ro.response_ids[k]) for k in range(n)]
        batches = [self._microbatches(ro, mini, extra) for mini in minis]
        for b in (b for mini in batches for b in mini):
            if dropped:
                b["loss_mask"] = b["loss_mask"] * b.pop("keep")
        t3 = time.perf_counter()
        record = self._update(batches, rows)
        t4 = time.perf_counter()
        record.update(rollout_metrics(ro, old_logp, [b for mini in batches for b in mini], values, t1 - t0))
        record.update(time_rollout_s=t1 - t0, time_reward_s=t2 - t1, time_prepare_s=t3 - t2, time_update_s=t4 - t3,
                      groups_dropped=int(dp_allreduce(torch.tensor([float(dropped)], dtype=torch.float64))[0]),
                      **fn_record)
        if self.rollout_log is not None:
            self.rollout_log.write(iteration + 1, ro)
        return record

    def _update(self, minis: list[list[dict]], mbs: int) -> dict:
        r, rt = self.rl, self.rt
        sums: dict[str, float] = {}
        actor_norms, critic_norms, value_losses, losses = [], [], [], []
        lr = self.actor.optimizer.param_groups[0]["lr"]
        # a mini-batch with no token left in the loss on any replica (dynamic sampling dropped all its groups) is no
        # update: its optimizer step would still move the weights (weight decay, Adam's momentum); the schedules
        # advance as if it ran, so the learning rate stays a function of the iteration
        kept = dp_allreduce(torch.tensor([float(sum(float(b["loss_mask"].sum()) for b in chunk)) for chunk in minis],
                                         dtype=torch.float64))
        skipped = 0
        for epoch in range(r.ppo_epochs):
            for m in range(r.mini_batches):
                chunk = minis[m]
                if kept[m] == 0:
                    skipped += 1
                    for role in (self.actor, self.critic):
                        if role is not None:
                            role.scheduler.step(increment=1)
                    continue
                seq = max(b["tokens"].shape[1] for b in chunk)
                actor_in = [{k: v for k, v in b.items() if k not in ("returns", "old_values")} for b in chunk]
                res = train_step(self.actor.model, self.actor.optimizer, actor_in, partial(actor_forward_step, r), seq,
                                 mbs, rt, sum_keys=ACTOR_KEYS)
                self.actor.scheduler.step(increment=1)
                losses.append(res.loss)
                actor_norms.append(res.grad_norm)
                for k, v in res.sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.critic is not None:
                    critic_in = [{k: v for k, v in b.items() if k in CRITIC_INPUTS} for b in chunk]
                    cres = train_step(self.critic.model, self.critic.optimizer, critic_in,
                                      partial(critic_forward_step, r), seq, mbs, rt, sum_keys=CRITIC_KEYS)
                    self.critic.scheduler.step(increment=1)
                    value_losses.append(cres.loss)
                    critic_norms.append(cres.grad_norm)
                    sums["value_clip_count"] = sums.get("value_clip_count", 0.0) + cres.sums["value_clip_count"]
        tokens = max(sums.get("response_tokens", 0.0), 1.0)
        sums = {k: sums.get(k, 0.0) for k in (*ACTOR_KEYS, *CRITIC_KEYS)} | sums

        def mean(values):  # over the updates that ran (0 when none did)
            return float(np.mean(values)) if values else 0.0

        out = {"loss": mean(losses), "lr": lr, "actor_grad_norm": mean(actor_norms), "updates_skipped": skipped,
               "entropy": sums["entropy_sum"] / tokens, "clip_fraction": sums["clip_count"] / tokens,
               "dual_clip_fraction": sums["dual_clip_count"] / tokens, "ratio_mean": sums["ratio_sum"] / tokens,
               "kl_old": sums["kl_old_sum"] / tokens}
        if self.ref is not None:
            out["kl_ref"] = sums["kl_ref_sum"] / tokens
        if self.critic is not None:
            out.update(value_loss=mean(value_losses), critic_grad_norm=mean(critic_norms),
                       value_clip_fraction=sums["value_clip_count"] / tokens,
                       critic_lr=self.critic.optimizer.param_groups[0]["lr"])
        return out

    # ------------------------------------------------------------------------------------------- what is said
    @property
    def finite_keys(self) -> tuple[str, ...]:
        norms = ("actor_grad_norm", "critic_grad_norm") if self.cfg.optim.clip_grad > 0 else ()
        # the whole objective: the entropy bonus and the KL loss are in the actor's loss beside the logged policy term
        return ("loss", "value_loss", "entropy", *(("kl_ref",) if self.ref is not None else ()), *norms)

    def evaluate(self, model, rt, step, last):
        """Greedy accuracy on ``rl.val_data`` every ``rl.val_interval`` iterations and at the last one (the shared
        checker): the final actor is always validated, also in a run shorter than the interval."""
        if self.val is None or (step % self.rl.val_interval and not last):
            return {}
        r = self.rl
        # each data-parallel replica generates its share (every dp-th prompt); the counts are summed over replicas
        mine = range(self.dp_rank, len(self.val.prompts), self.dp)
        texts = self.generator.generate([self.val.prompts[i] for i in mine], r.max_response_tokens,
                                        stop_strings=tuple(r.stop_strings)) if len(mine) else []
        right = sum(judge(r.reward_suite, judged_text(t, r.reward_cut_at_stop), self.val.gold[i], r.reward_scoring)
                    for t, i in zip(texts, mine))
        counts = dp_allreduce(torch.tensor([float(right), float(len(texts))], dtype=torch.float64))
        return {"val_accuracy": float(counts[0]) / max(float(counts[1]), 1.0), "val_examples": int(counts[1])}

    def describe(self) -> str:
        r = self.rl
        roles = "actor" + (" + critic" if self.critic is not None else "") + (" + reference" if self.ref else "")
        return (f"{roles} | {r.prompts_per_step} prompts x {r.samples_per_prompt} samples, {r.ppo_epochs} epoch(s) "
                f"x {r.mini_batches} mini-batch(es) | {len(self.prompts):,} RL prompts"
                + (f" ({self.skipped:,} longer than rl.max_prompt_tokens={r.max_prompt_tokens} skipped)"
                   if self.skipped else "")
                + (f" ({self.prompts.short_budget:,} {self._short_budget()}: their responses get only the rest of "
                   "the context)" if self.prompts.short_budget else ""))

    def _short_budget(self) -> str:
        room, r = self.cfg.model.seq_length - self.rl.max_response_tokens, self.rl
        if room > 0:
            return f"longer than model.seq_length - rl.max_response_tokens = {room} tokens"
        return (f"prompts, as rl.max_response_tokens={r.max_response_tokens} is not below "
                f"model.seq_length={self.cfg.model.seq_length}")

    def lineage(self) -> dict:
        r = self.rl
        return {"data": self.cfg.data.hf_dataset or ",".join(prompt_files(self.cfg)), "prompts": len(self.prompts),
                "algorithm": self.cfg.stage, "rollouts": self.plan.iters * r.prompts_per_step * r.samples_per_prompt}

    def postfix(self, record):
        return {"reward": f"{record['reward_mean']:.3f}", "len": f"{record['response_length_mean']:.0f}"}

    def checkpoint_extra(self, step):
        return {"consumed_prompts": step * self.rl.prompts_per_step, "rl_sources": dict(self.sources)}


def build(cfg: RootConfig, plan, rt) -> RLStage:
    return RLStage(cfg, plan, rt)


def synthetic_size(cfg: RootConfig) -> int:
    """Prompts in the demo's generated RL set (``data.source=synthetic``)."""
    return RL_EXAMPLES
