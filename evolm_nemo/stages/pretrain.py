"""Pretraining and CPT: the next-token loss over packed documents of a megatron GPTDataset (a BlendedDataset for a
replay mix); CPT is the same stage started from ``train.init_from``."""

from __future__ import annotations

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens, iterations_for, parse_tokens
from evolm_nemo.model.build import flops_per_token
from evolm_nemo.stages.base import Stage


def plan_iters(cfg: RootConfig, dp: int) -> int:
    t = cfg.train
    if t.epochs is not None:
        raise ConfigError("train.epochs", f"applies to stage=sft; {cfg.stage} takes train.tokens or train.iters "
                                          "(set train.epochs=null)")
    if (t.tokens is None) == (t.iters is None):
        raise ConfigError("train.tokens", "set exactly one of train.tokens (e.g. 160B) or train.iters")
    if t.iters is not None:
        if t.iters <= 0:
            raise ConfigError("train.iters", f"must be > 0, got {t.iters}")
        return t.iters
    return iterations_for(parse_tokens(t.tokens), cfg.parallel.global_batch_size, cfg.model.seq_length)


class PretrainStage(Stage):
    def __init__(self, cfg: RootConfig, plan, rt):
        from megatron.core import parallel_state

        from evolm_nemo.data.gpt import (BatchSchedule, SourceTokens, build_dataset, build_validation, resolve_source,
                                         source_names)
        from evolm_nemo.data.tokenizer import load_tokenizer

        p, m = cfg.parallel, cfg.model
        self.cfg, self.plan = cfg, plan
        source = resolve_source(cfg)
        tokenizer = load_tokenizer(source.tokenizer, key="data.tokenizer")
        if len(tokenizer) > m.vocab_size:
            raise ConfigError("model.vocab_size",
                              f"{m.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        if rt.is_main:  # the plan first: megatron's index build can take minutes on a large corpus
            print(f"[evolm] plan: {cfg.stage} {m.name}, {plan.iters:,} iters x {plan.tokens_per_iter:,} tokens = "
                  f"{plan.iters * plan.tokens_per_iter:,} tokens ({plan.iters * p.global_batch_size:,} samples); "
                  "building the dataset indices", flush=True)
        samples = plan.iters * p.global_batch_size
        if cfg.train.branch_from:  # a WSD branch reads the stable run's dataset (its size decides megatron's order)
            from evolm_nemo.train.wsd import resolve_branch

            samples = max(plan.iters, resolve_branch(cfg, plan.iters).stable_iters) * p.global_batch_size
        dataset = build_dataset(cfg, source, tokenizer, samples)
        self.schedule = BatchSchedule(dataset, p.global_batch_size, p.micro_batch_size,
                                      parallel_state.get_data_parallel_rank(), plan.dp)
        self.tokenizer = source.tokenizer
        self.is_main = rt.is_main
        names = source_names(cfg, source)
        self.sources = (SourceTokens(dataset, names, p.global_batch_size, m.seq_length, source.groups)
                        if len(names) > 1 else None)  # per-source accounting of a blend (CPT replay)
        self.val, self.val_every, self.val_start, self.val_start_logged = {}, 0, None, False
        if cfg.train.val_tokens_interval:  # held-out loss per source (checkpoint dynamics, forgetting in CPT)
            every = parse_tokens(cfg.train.val_tokens_interval, "train.val_tokens_interval")
            self.val_every = max(1, -(-every // plan.tokens_per_iter))
            sets = build_validation(cfg, source, tokenizer, names, cfg.train.val_batches * p.global_batch_size)
            self.val = {name: BatchSchedule(ds, p.global_batch_size, p.micro_batch_size,
                                            parallel_state.get_data_parallel_rank(), plan.dp)
                        for name, ds in sets.items()}
        self.probe = None
        if cfg.probe.tokens_interval:  # capability probes of the live model (checkpoint dynamics)
            from evolm_nemo.train.dynamics import ProbeHook

            self.probe = ProbeHook(cfg, tokenizer, plan.tokens_per_iter, rt.is_main)
        self.tokens_per_iter = plan.tokens_per_iter
        self.fpt = flops_per_token(m)

    def microbatches(self, iteration):
        return self.schedule.microbatches(iteration)

    def seq_length(self, batches) -> int:
        return self.cfg.model.seq_length

    def describe(self) -> str:
        total = self.plan.iters * self.tokens_per_iter
        budget = f" (budget train.tokens={self.cfg.train.tokens})" if self.cfg.train.tokens else ""
        return f"{self.tokens_per_iter:,} tokens/iter = {format_tokens(total)} tokens{budget}"

    def lineage(self) -> dict:
        d = self.cfg.data
        record = {"data": d.hf_dataset or d.name, "tokens": self.plan.iters * self.tokens_per_iter}
        if self.sources is not None:
            record["mix"] = dict(zip(self.sources.names, self.sources.plan))
        return record

    def metrics(self, iteration, result, step_s, peak_flops, world_size):
        tps = self.tokens_per_iter / step_s
        out = {"tokens": (iteration + 1) * self.tokens_per_iter, "tokens_per_s": tps,
               "mfu": (self.fpt * tps / (peak_flops * world_size)) if peak_flops else None}
        if self.sources is not None:
            out.update({f"tokens_{n}": t for n, t in self.sources.tokens(iteration + 1).items()})
            if iteration + 1 == self.plan.iters and self.is_main:
                print(f"[evolm] {self.sources.summary(iteration + 1)}", flush=True)
        return out

    def heldout_loss(self, model, rt) -> dict[str, float]:
        """Per-token loss of the live model on each source's held-out samples (forward only, every rank)."""
        import torch

        from evolm_nemo.train.loop import train_step

        p, out = self.cfg.parallel, {}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for name, schedule in self.val.items():
                    total = tokens = 0.0
                    for b in range(self.cfg.train.val_batches):
                        r = train_step(model, None, schedule.microbatches(b), self.forward_step,
                                       self.cfg.model.seq_length, p.micro_batch_size, rt, forward_only=True)
                        total, tokens = total + r.loss * r.tokens, tokens + r.tokens
                    out[name] = total / max(tokens, 1.0)
        finally:
            model.train(was_training)
        return out

    def prepare(self, model, rt, start, out_dir):
        if start >= self.plan.iters:
            return
        if self.val:  # before the first step: the parent's (or the resumed checkpoint's) held-out losses
            self.val_start = (start, self.heldout_loss(model, rt))
        if self.probe is not None:
            self.probe.prepare(model, start)

    def evaluate(self, model, rt, step, last):
        out = self._validation(model, rt, step, last)
        if self.probe is not None and self.probe.due(step, last):
            out.update(self.probe.run(model, step, last))
            if last and rt.is_main:
                begin, before, _ = self.probe.start
                parts = [f"{k[6:]} {before[k]:.1f} -> {out[k]:.1f}" for k in before]
                print(f"[evolm] probes (percent), iteration {begin} -> {step}: {', '.join(parts)}", flush=True)
        return out

    def _validation(self, model, rt, step, last):
        if not self.val or not (last or step % self.val_every == 0):
            return {}
        import time

        t0 = time.perf_counter()
        losses = self.heldout_loss(model, rt)
        out = {f"val_loss_{n}": v for n, v in losses.items()}
        out["val_s"] = time.perf_counter() - t0
        if self.val_start is not None:
            begin, before = self.val_start
            if last or not self.val_start_logged:  # the first record and the last carry it
                out.update({f"val_loss_{n}_at_{begin}": v for n, v in before.items()})
                self.val_start_logged = True
            if last and rt.is_main:
                parts = [f"{n} {before[n]:.4f} -> {v:.4f} ({v - before[n]:+.4f})" for n, v in losses.items()]
                print(f"[evolm] held-out loss per source, iteration {begin} -> {step}: {', '.join(parts)}",
                      flush=True)
        return out

    def postfix(self, record):
        return {"tok_s": f"{record['tokens_per_s']:,.0f}"}

    def checkpoint_extra(self, step):
        extra = {"consumed_samples": step * self.cfg.parallel.global_batch_size, "tokens": step * self.tokens_per_iter}
        if self.sources is not None:
            extra["tokens_by_source"] = self.sources.tokens(step)
        return extra


def build(cfg: RootConfig, plan, rt) -> PretrainStage:
    return PretrainStage(cfg, plan, rt)
