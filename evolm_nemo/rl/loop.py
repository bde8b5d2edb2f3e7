"""The outer RL loop: rollout (live actor) -> reward (answer checker) -> old log-probs / values (forward only) ->
advantages (GAE or group-relative) -> PPO epochs x mini-batches of engine steps for the actor (and critic).

Roles, all megatron-core models on the same ranks (TP/DP; pp = 1 because the inference engine needs it): the actor
(from ``train.init_from``), the critic (PPO: the same backbone, or ``rl.critic_init``, with a fresh scalar head), the
reference (frozen, built only when a KL term is on). Each trainable role has its own megatron optimizer and
scheduler. The whole state -- actor, critic, both optimizers and schedulers, the data position -- is checkpointed:
the critic under ``critic/`` first, then the actor under ``checkpoints/`` (its commit is the commit of the pair), so
``export-hf src=<run>`` exports the actor and ``export-hf src=<run>/critic`` the critic.

Rollout sampling is seeded by (``train.seed``, iteration, data-parallel rank), so a resumed run rolls out exactly what
the uninterrupted one did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.compose import to_dict
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.fileio import drop_rows_after
from evolm_nemo.losses import rl as L
from evolm_nemo.rl import objectives as O
from evolm_nemo.rl.data import PromptSchedule, prompt_files, read_prompts, usable_prompts
from evolm_nemo.rl.reward import combine as combine_rewards
from evolm_nemo.rl.rollout import Rollout, generate, verifiable_rewards
from evolm_nemo.runtime.signals import StopSignal, children_die_with_parent
from evolm_nemo.train.loop import TrainResult, _lineage, build_training_model, resume_check, stop_line, train_step
from evolm_nemo.train.metrics import MetricsWriter

ACTOR_KEYS = ("entropy_sum", "kl_ref_sum", "response_tokens", "clip_count", "dual_clip_count", "ratio_sum",
              "kl_old_sum")
CRITIC_KEYS = ("value_clip_count",)


def _dp_allreduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In place over the data-parallel replicas (tensor-parallel ranks hold the same values already)."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=op, group=parallel_state.get_data_parallel_group())
    return t


def _global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    s, sq, n = L.masked_moments(x, mask)
    t = _dp_allreduce(torch.stack([s, sq, n]).double())
    mean = float(t[0] / t[2].clamp(min=1))
    return mean, max(float(t[1] / t[2].clamp(min=1)) - mean * mean, 0.0)


class RLRun:
    """Everything one RL run holds; ``step(iteration)`` does one rollout + update and returns its metrics."""

    def __init__(self, cfg: RootConfig, plan, rt, prompts):
        from megatron.core import parallel_state

        from evolm_nemo.data.tokenizer import load_tokenizer
        from evolm_nemo.generation.engine import Generator
        from evolm_nemo.model.build import build_model
        from evolm_nemo.model.heads import build_value_model

        self.cfg, self.plan, self.rt, self.rl = cfg, plan, rt, cfg.rl
        self.grpo = cfg.stage == "grpo"
        p, r = cfg.parallel, cfg.rl
        self.dp, self.dp_rank = plan.dp, parallel_state.get_data_parallel_rank()
        self.prompts = prompts
        self.schedule = PromptSchedule(len(prompts), r.prompts_per_step, cfg.train.seed, self.dp_rank, self.dp)
        self.steps_per_iter = r.ppo_epochs * r.mini_batches
        self.tokenizer_ref = ckpt.read_meta(ckpt.resolve(cfg.train.init_from)).get("tokenizer") or cfg.data.tokenizer
        self.tokenizer = load_tokenizer(self.tokenizer_ref, key="train.init_from")

        self.actor, self.actor_opt, make = build_training_model(cfg, rt)
        self.actor_sched = make(plan.iters * self.steps_per_iter)
        self.critic = self.critic_opt = self.critic_sched = None
        if not self.grpo:
            o = cfg.optim
            ccfg = dataclasses.replace(cfg, optim=dataclasses.replace(o, lr=r.critic_lr,
                                                                       min_lr=min(o.min_lr, r.critic_lr)))
            self.critic, self.critic_opt, make_c = build_training_model(ccfg, rt, build_value_model)
            self.critic_sched = make_c(plan.iters * self.steps_per_iter)
        self.ref = None
        if r.kl != "off":
            self.ref = build_model(cfg.model, p, rt.dtype)
            ckpt.load_weights(cfg.train.init_from, [self.ref])
            self.ref.eval()
        self.rm = None
        if r.reward != "verifiable":  # the reward role: a frozen value-head model (rl/reward.py)
            from evolm_nemo.rl.reward import RewardModelScorer

            self.rm = RewardModelScorer(cfg, rt)
        max_seq = min(cfg.model.seq_length, r.max_prompt_tokens + r.max_response_tokens)
        self.generator = Generator(self.actor, self.tokenizer, max_seq=max_seq, max_batch=r.rollout_micro_batch_size)
        self.eos = int(self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------------------------------- state
    def load(self, begin: ckpt.RunStart, critic_root: Path, layout: dict) -> tuple[int, dict | None]:
        t = self.cfg.train
        resume_from = begin.checkpoint  # verified, with its critic namesake (ckpt.start_run)
        if resume_from is not None:
            state = ckpt.load(resume_from, [self.actor], self.actor_opt, self.actor_sched, layout=layout,
                              verified=True)
            if self.critic is not None:
                ckpt.load(critic_root / resume_from.name, [self.critic], self.critic_opt, self.critic_sched,
                          restore_rng=False, layout=layout, verified=True)
            return state["iteration"], state["meta"]
        parent = ckpt.load_weights(t.init_from, [self.actor])
        self.actor_opt.reload_model_params()
        if self.critic is not None:
            from evolm_nemo.model.heads import load_backbone

            load_backbone(self.rl.critic_init or t.init_from, [self.critic])
            self.critic_opt.reload_model_params()
        return 0, parent

    def save(self, root: Path, critic_root: Path, step: int, meta: dict, layout: dict) -> Path:
        keep = self.cfg.train.keep_last
        extra = {"consumed_prompts": step * self.rl.prompts_per_step}
        if self.critic is not None:  # first: the actor's commit below is the commit of the pair
            ckpt.save(critic_root, step, [self.critic], self.critic_opt, self.critic_sched, extra=extra,
                      meta={**meta, "head": "value", "role": "critic"}, keep_last=keep, layout=layout)
        return ckpt.save(root, step, [self.actor], self.actor_opt, self.actor_sched, extra=extra,
                         meta={**meta, "role": "actor"}, keep_last=keep, layout=layout)

    # ------------------------------------------------------------------------------------------- one iteration
    def rollout(self, iteration: int) -> Rollout:
        idx = self.schedule.indices(iteration)
        seed = (self.cfg.train.seed * 1_000_003 + iteration * 1009 + self.dp_rank) % (2 ** 31)
        return generate(self.generator, [self.prompts.prompts[i] for i in idx], [self.prompts.gold[i] for i in idx],
                        self.rl.samples_per_prompt, self.rl, self.eos, seed)

    def _microbatches(self, ro: Rollout, order: list[int], extra: dict[str, list[list[float]]]) -> list[dict]:
        mbs = self.cfg.parallel.micro_batch_size
        seqs = [(ro.prompt_ids[k] + ro.response_ids[k], len(ro.prompt_ids[k])) for k in range(len(ro))]
        out = []
        for i in range(0, len(order), mbs):
            rows = order[i:i + mbs]
            out.append(O.collate([seqs[k] for k in rows], {key: [v[k] for k in rows] for key, v in extra.items()},
                                 pad_id=self.eos))
        return out

    def _per_token(self, outputs: list[torch.Tensor], batches: list[dict], order: list[int], n: int) -> list:
        """Scatter microbatch outputs back to per-sequence lists over response positions."""
        rows: list = [None] * n
        i = 0
        for out, b in zip(outputs, batches):
            for row in range(out.shape[0]):
                mask = b["loss_mask"][row].bool()
                rows[order[i]] = out[row][mask].tolist()
                i += 1
        return rows

    def step(self, iteration: int) -> dict:
        r, rt = self.rl, self.rt
        mbs = self.cfg.parallel.micro_batch_size
        t0 = time.perf_counter()
        ro = self.rollout(iteration)
        t1 = time.perf_counter()
        ro.correct = verifiable_rewards(ro, r.reward_suite, r.reward_scoring)
        ro.rm_scores = self.rm.score(ro.prompt_ids, ro.response_ids, self.eos) if self.rm is not None else None
        ro.rewards = combine_rewards(ro.correct, ro.rm_scores, self.cfg)
        t2 = time.perf_counter()
        n = len(ro)
        order = list(range(n))
        base = self._microbatches(ro, order, {})
        old_logp = self._per_token(O.forward_collect(self.actor, base, O.logprob_forward_step, mbs, rt), base, order, n)
        ref_logp = (self._per_token(O.forward_collect(self.ref, base, O.logprob_forward_step, mbs, rt), base, order, n)
                    if self.ref is not None else None)
        # token-level rewards: the verifiable reward on the last response token, minus k1 KL when kl=reward
        rewards = []
        for k in range(n):
            rw = [0.0] * len(ro.response_ids[k])
            rw[-1] = ro.rewards[k]
            if r.kl == "reward":
                rw = [x - r.initial_policy_kl_penalty * (a - b) for x, a, b in zip(rw, old_logp[k], ref_logp[k])]
            rewards.append(rw)
        extra = {"old_logp": old_logp, "rewards": rewards}
        if r.tis_cap is not None:
            extra["engine_logp"] = ro.engine_logp
        if ref_logp is not None:
            extra["ref_logp"] = ref_logp
        keep = [1.0] * n
        dropped = 0
        if self.grpo:
            g = torch.tensor(ro.rewards, dtype=torch.float64)
            adv = L.group_advantages(g, r.samples_per_prompt, normalize_std=r.grpo_normalize_std)
            if r.dynamic_sampling:
                const = L.constant_groups(g, r.samples_per_prompt).repeat_interleave(r.samples_per_prompt)
                keep = [0.0 if c else 1.0 for c in const.tolist()]
                dropped = int(const.sum()) // r.samples_per_prompt
            extra["advantages"] = [[float(adv[k]) * keep[k]] * len(ro.response_ids[k]) for k in range(n)]
            values = None
        else:
            values = self._per_token(O.forward_collect(self.critic, base, O.value_forward_step, mbs, rt), base, order,
                                     n)
            extra["old_values"] = values
        batches = self._microbatches(ro, order, extra)
        if not self.grpo:
            for b in batches:
                adv, ret = L.gae(b["rewards"], b["old_values"], b["loss_mask"], r.discount_factor, r.gae_lambda)
                b["advantages"], b["returns"] = adv, ret
            if r.whiten_advantages:
                mask = torch.cat([b["loss_mask"].flatten() for b in batches])
                flat = torch.cat([b["advantages"].flatten() for b in batches])
                mean, var = _global_moments(flat, mask)
                for b in batches:
                    b["advantages"] = L.whiten_with(b["advantages"], b["loss_mask"], mean, var)
        if r.tis_cap is not None:  # the engine reports no log p for a final EOS: weight 1 there
            for b in batches:
                eng = b.pop("engine_logp")
                eng = torch.where(torch.isnan(eng), b["old_logp"], eng)
                b["tis"] = L.truncated_importance_weights(b["old_logp"], eng, r.tis_cap)
        for b, k0 in zip(batches, range(0, n, mbs)):
            if dropped:
                rows = order[k0:k0 + mbs]
                b["loss_mask"] = b["loss_mask"] * torch.tensor([keep[k] for k in rows]).unsqueeze(1)
            b.pop("rewards")
        t3 = time.perf_counter()
        record = self._update(batches)
        t4 = time.perf_counter()
        record.update(self._rollout_metrics(ro, old_logp, batches, values, t1 - t0))
        record.update(time_rollout_s=t1 - t0, time_reward_s=t2 - t1, time_prepare_s=t3 - t2, time_update_s=t4 - t3,
                      groups_dropped=dropped)
        self.last_rollout = ro
        return record

    def _update(self, batches: list[dict]) -> dict:
        r, rt, mbs = self.rl, self.rt, self.cfg.parallel.micro_batch_size
        per_mini = len(batches) // r.mini_batches
        sums: dict[str, float] = {}
        actor_norms, critic_norms, value_losses, losses = [], [], [], []
        lr = self.actor_opt.param_groups[0]["lr"]
        for epoch in range(r.ppo_epochs):
            for m in range(r.mini_batches):
                chunk = batches[m * per_mini:(m + 1) * per_mini]
                seq = max(b["tokens"].shape[1] for b in chunk)
                actor_in = [{k: v for k, v in b.items() if k not in ("returns", "old_values")} for b in chunk]
                res = train_step(self.actor, self.actor_opt, actor_in, partial(O.actor_forward_step, r), seq, mbs, rt,
                                 sum_keys=ACTOR_KEYS)
                self.actor_sched.step(increment=1)
                losses.append(res.loss)
                actor_norms.append(res.grad_norm)
                for k, v in res.sums.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.critic is not None:
                    critic_in = [{k: b[k] for k in ("tokens", "labels", "position_ids", "loss_mask", "returns",
                                                    "old_values")} for b in chunk]
                    cres = train_step(self.critic, self.critic_opt, critic_in, partial(O.critic_forward_step, r),
                                      seq, mbs, rt, sum_keys=CRITIC_KEYS)
                    self.critic_sched.step(increment=1)
                    value_losses.append(cres.loss)
                    critic_norms.append(cres.grad_norm)
                    sums["value_clip_count"] = sums.get("value_clip_count", 0.0) + cres.sums["value_clip_count"]
        tokens = max(sums.get("response_tokens", 0.0), 1.0)
        out = {"loss": float(np.mean(losses)), "lr": lr, "actor_grad_norm": float(np.mean(actor_norms)),
               "entropy": sums["entropy_sum"] / tokens, "clip_fraction": sums["clip_count"] / tokens,
               "dual_clip_fraction": sums["dual_clip_count"] / tokens, "ratio_mean": sums["ratio_sum"] / tokens,
               "kl_old": sums["kl_old_sum"] / tokens}
        if self.ref is not None:
            out["kl_ref"] = sums["kl_ref_sum"] / tokens
        if self.critic is not None:
            out.update(value_loss=float(np.mean(value_losses)), critic_grad_norm=float(np.mean(critic_norms)),
                       value_clip_fraction=sums["value_clip_count"] / tokens,
                       critic_lr=self.critic_opt.param_groups[0]["lr"])
        return out

    def _rollout_metrics(self, ro: Rollout, old_logp: list, batches: list[dict], values, rollout_s: float) -> dict:
        lengths = torch.tensor(ro.response_lengths, dtype=torch.float64)
        n = torch.tensor(float(len(ro)), dtype=torch.float64)
        # the engine's log p vs the trainer's recomputed one, over tokens the engine reported
        diffs = [abs(a - b) for e, o in zip(ro.engine_logp, old_logp) for a, b in zip(e, o) if not math.isnan(a)]
        ratios = [math.exp(b - a) for e, o in zip(ro.engine_logp, old_logp) for a, b in zip(e, o) if not math.isnan(a)]
        local = torch.tensor([sum(ro.rewards), float(lengths.sum()), float(sum(ro.truncated)), n, sum(diffs),
                              float(len(diffs)), sum(ratios), sum(ro.correct), sum(ro.rm_scores or [0.0])],
                             dtype=torch.float64)
        g = _dp_allreduce(local.clone())
        mx = _dp_allreduce(torch.tensor([float(lengths.max()), max(diffs, default=0.0)], dtype=torch.float64),
                           dist.ReduceOp.MAX)
        rec = {"reward_mean": float(g[0] / g[3]), "correct_ratio": float(g[7] / g[3]),
               "response_length_mean": float(g[1] / g[3]), "response_length_max": int(mx[0]),
               "truncated_fraction": float(g[2] / g[3]), "logp_mismatch_mean": float(g[4] / max(g[5], 1)),
               "logp_mismatch_max": float(mx[1]), "prob_ratio_mean": float(g[6] / max(g[5], 1)),
               "rollout_tokens_per_s": float(g[1]) / max(rollout_s, 1e-9)}  # response tokens, all dp replicas
        if ro.rm_scores is not None:
            rec["rm_score_mean"] = float(g[8] / g[3])
        if values is not None:  # explained variance of the critic's values for the returns, over the global batch
            mask = torch.cat([b["loss_mask"].flatten() for b in batches])
            ret = torch.cat([b["returns"].flatten() for b in batches])
            val = torch.cat([b["old_values"].flatten() for b in batches])
            _, var_r = _global_moments(ret, mask)
            _, var_e = _global_moments(ret - val, mask)
            rec["explained_variance"] = 1.0 - var_e / var_r if var_r > 0 else float("nan")
            rec["value_mean"] = _global_moments(val, mask)[0]
        return rec


class RolloutLog:
    """``rollouts.jsonl``: one row per response (iteration, prompt/response ids, the engine's log-probs, text,
    reward), written by tensor-parallel rank 0 of every data-parallel replica (``rollouts.dp<r>.jsonl`` beyond dp
    rank 0); rows past the resumed iteration are dropped first."""

    def __init__(self, path: Path, start: int, dp_rank: int):
        from megatron.core import parallel_state

        self.enabled = parallel_state.get_tensor_model_parallel_rank() == 0
        self.path = path if dp_rank == 0 else path.with_name(f"rollouts.dp{dp_rank}.jsonl")
        if self.enabled:
            drop_rows_after(self.path, start)

    def write(self, iteration: int, ro: Rollout) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for k in range(len(ro)):
                f.write(json.dumps({"iteration": iteration, "prompt_ids": ro.prompt_ids[k],
                                    "response_ids": ro.response_ids[k],
                                    "engine_logp": [None if math.isnan(x) else x for x in ro.engine_logp[k]],
                                    "text": ro.texts[k], "gold_answer": ro.gold[k], "reward": ro.rewards[k],
                                    "correct": ro.correct[k],
                                    **({"rm_score": ro.rm_scores[k]} if ro.rm_scores is not None else {}),
                                    "truncated": ro.truncated[k]}) + "\n")


def validate_greedy(run: RLRun, val) -> float:
    from evolm_nemo.answers import judge

    texts = run.generator.generate(val.prompts, run.rl.max_response_tokens, stop_strings=tuple(run.rl.stop_strings))
    right = sum(judge(run.rl.reward_suite, t, g, run.rl.reward_scoring) for t, g in zip(texts, val.gold))
    return right / max(len(texts), 1)


def rl_fit(cfg: RootConfig, plan) -> TrainResult:
    """The RL run; SIGTERM ends it after the current iteration as in ``train.loop.fit`` (exit code 143)."""
    children_die_with_parent()
    with StopSignal() as stop:
        return _rl_fit(cfg, plan, stop)


def _rl_fit(cfg: RootConfig, plan, stop: StopSignal) -> TrainResult:
    from evolm_nemo.runtime.distributed import setup

    p, t, r = cfg.parallel, cfg.train, cfg.rl
    rt = setup(p.tp, p.pp, t.seed, t.precision)
    stop.device = rt.device
    out = Path(cfg.run.out_dir)
    root, critic_root = out / "checkpoints", out / "critic"
    roots = [root] + ([critic_root] if cfg.stage != "grpo" else [])  # a PPO checkpoint is the actor + critic pair
    starting = dict(resume=t.resume, overwrite=t.overwrite, check=resume_check(cfg, plan.iters))
    ckpt.start_run(out, roots, dry=True, **starting)  # the cheap refusals before anything is built
    prompts, _ = usable_prompts(cfg)
    val = read_prompts([r.val_data], "rl.val_data") if r.val_data and r.val_interval else None
    if val is not None:
        val = type(val)(val.ids[:r.val_size], val.prompts[:r.val_size], val.gold[:r.val_size])
    ckpt.lock_run_dir(out)
    begin = ckpt.start_run(out, roots, **starting)  # checksums, fall-back, overwrite: under the lock
    run = RLRun(cfg, plan, rt, prompts)
    layout = {"tp": p.tp, "pp": p.pp, "dp": plan.dp}
    start, parent_meta = run.load(begin, critic_root, layout)
    resumed = begin.checkpoint is not None
    if rt.is_main:
        roles = "actor" + (" + critic" if run.critic is not None else "") + (" + reference" if run.ref else "")
        print(f"[evolm] {cfg.stage} {cfg.model.name}: {roles} | tp={p.tp} dp={plan.dp} | {rt.dtype} on "
              f"{rt.device.type} | {plan.iters} iters x {r.prompts_per_step} prompts x {r.samples_per_prompt} "
              f"samples, {r.ppo_epochs} epoch(s) x {r.mini_batches} mini-batch(es) | {len(prompts):,} RL prompts"
              + (f" | resuming at iteration {start}" if start else ""), flush=True)
    record = {"data": cfg.data.hf_dataset or ",".join(prompt_files(cfg)), "prompts": len(prompts),
              "algorithm": cfg.stage, "rollouts": plan.iters * r.prompts_per_step * r.samples_per_prompt}
    lineage = parent_meta.get("lineage") if resumed else _lineage(cfg, parent_meta, record)
    tokenizer_ref = os.path.abspath(run.tokenizer_ref) if os.path.isdir(run.tokenizer_ref) else run.tokenizer_ref
    meta = {"model": dataclasses.asdict(cfg.model), "config": to_dict(cfg), "tokenizer": tokenizer_ref,
            "stage": cfg.stage, "lineage": lineage, "run_id": begin.run_id, "planned_iters": plan.iters}
    if signum := stop.requested():
        raise stop_line(rt, signum, start, begin.checkpoint, t.save_on_signal)
    writer = MetricsWriter(out, enabled=rt.is_main, tensorboard=t.tensorboard, truncate_after=start)
    bar = None
    if rt.is_main and t.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.iters, initial=start, desc=cfg.stage, unit="it", dynamic_ncols=True,
                   mininterval=1.0 if sys.stderr.isatty() else 15.0)
    history, saved = [], None
    rollouts = RolloutLog(out / "rollouts.jsonl", start, run.dp_rank) if r.save_rollouts else None
    for it in range(start, plan.iters):
        tick = time.perf_counter()
        rec = run.step(it)
        step = it + 1
        if rollouts is not None:
            rollouts.write(step, run.last_rollout)
        if val is not None and step % r.val_interval == 0:
            rec["val_accuracy"] = validate_greedy(run, val)
        rec = {"iteration": step, **rec, "step_s": time.perf_counter() - tick}
        if not math.isfinite(rec["loss"]):
            raise RuntimeError(f"loss is {rec['loss']} at iteration {step}; lower optim.lr or check the data")
        history.append(rec["reward_mean"])
        if step % t.log_interval == 0 or step == plan.iters:
            writer.write(rec)
        if bar is not None:
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}", len=f"{rec['response_length_mean']:.0f}")
            bar.update(1)
        signum = stop.requested()  # SIGTERM on any rank: all stop after this iteration (saved first, by default)
        if (t.save_interval and step % t.save_interval == 0) or step == plan.iters or (signum and t.save_on_signal):
            saved = run.save(root, critic_root, step, meta, layout)
        if signum and step < plan.iters:
            if bar is not None:
                bar.close()
            writer.close()
            raise stop_line(rt, signum, step, saved or begin.checkpoint, t.save_on_signal)
    if bar is not None:
        bar.close()
    writer.close()
    return TrainResult(iterations=plan.iters, start=start, losses=history, checkpoint=str(saved or ckpt.latest(root)
                                                                                         or ""),
                       tokenizer=run.tokenizer_ref, out_dir=str(out), runtime=rt, model=run.actor)
