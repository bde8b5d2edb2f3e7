"""Pretraining and CPT: the next-token loss over packed documents of a megatron GPTDataset (a BlendedDataset for a
replay mix); CPT is the same stage started from ``train.init_from``. Its plan checks the data
(``stages.pretrain_data``), then, given the iterations, WSD branches, held-out validation and the probes
(``check_plan``)."""

from __future__ import annotations

import sys
from pathlib import Path

from evolm_nemo.checkpoint import io as ckpt
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import format_tokens, iterations_for, parse_tokens
from evolm_nemo.config.validate import once, positive
from evolm_nemo.data.gpt import (BatchSchedule, SourceTokens, build_dataset, build_validation, resolve_source,
                                 source_names)
from evolm_nemo.data.indexed import read_manifest
from evolm_nemo.data.tokenizer import load_tokenizer
from evolm_nemo.evaluation.upstream import check_tasks
from evolm_nemo.model.build import flops_per_token
from evolm_nemo.stages import check_budget_keys
from evolm_nemo.stages.base import Stage, batch_identity, file_fingerprint, fingerprint
from evolm_nemo.stages.pretrain_data import (check_budget, check_data, check_mix_sizes, check_sources, check_split,
                                             check_validation)
from evolm_nemo.tasks import SUITES
from evolm_nemo.train import wsd
from evolm_nemo.train.dynamics import ProbeHook
from evolm_nemo.train.engine import train_step
from evolm_nemo.train.loop import Start


def iterations(cfg: RootConfig) -> int:
    """The run's iterations from train.tokens or train.iters (one of them; train.epochs is SFT's)."""
    t = cfg.train
    check_budget_keys(cfg)
    if t.iters is not None:
        return t.iters
    return iterations_for(parse_tokens(t.tokens), cfg.parallel.global_batch_size, cfg.model.seq_length)


def plan_iters(cfg: RootConfig, dp: int) -> int:
    """Check the data (files, manifests, token ids, tokenizer, split), derive the iterations, and refuse budgets a
    sample index cannot hold or that would repeat a source of a mix."""
    d = cfg.data
    check_data(cfg)
    check_split(d.split)
    source_tokens = check_sources(cfg) if d.source == "indexed" else None
    iters = iterations(cfg)
    check_budget(cfg, iters, sum(source_tokens) if source_tokens is not None else None)
    if source_tokens is not None:
        check_mix_sizes(cfg, iters, source_tokens)
    return iters


def data_identity(cfg: RootConfig) -> dict:
    """What defines a pretraining / CPT run's data and batch (a resume may not change it; a new mix is a new run --
    CPT from ``train.init_from``, a WSD branch from ``train.branch_from``): the sources (a sharded preparation by
    its manifest's content hash, a prefix by a fingerprint of its .bin and .idx), their weights and split, or the
    generated corpora's settings; the global batch, sequence length and seed."""
    d = cfg.data
    if d.source == "indexed":
        sources = {"data.paths": [_source_fingerprint(p) for p in d.paths], "data.split": str(d.split)}
    else:
        sources = {"data.synthetic_kinds": list(d.synthetic_kinds), "data.synthetic_docs": d.synthetic_docs,
                   "data.synthetic_seed": d.synthetic_seed}
    weights = [float(w) for w in d.weights] if d.weights is not None else None
    return {"data.source": d.source, **sources, "data.weights": weights, **batch_identity(cfg)}


def _source_fingerprint(prefix: str) -> str:
    manifest = None if Path(prefix + ".bin").exists() else read_manifest(prefix)
    if manifest is not None:
        return fingerprint(manifest.get("content_sha256"))
    return fingerprint(file_fingerprint(prefix + ".bin"), file_fingerprint(prefix + ".idx"))


def kept_dirs(cfg: RootConfig) -> tuple[str, ...]:
    """Where a run keeps checkpoints beside its regular ones: a WSD stable run's branch points, owned by its run
    like the rest (a fresh run into the directory refuses them; ``train.overwrite=true`` removes them; with no newer
    regular checkpoint, a resume starts from the newest)."""
    return (wsd.BRANCHES,)


def check_plan(cfg: RootConfig, iters: int) -> None:
    """What needs the iterations besides the schedule (``config.validate.check_schedule``, run before): a stable
    run's branch budgets, a branch's stable checkpoint (evolm.json only), held-out validation, and the probes."""
    wsd.check_stable(cfg, iters)
    if cfg.train.branch_from:
        wsd.resolve_branch(cfg, iters)
    if cfg.train.val_tokens_interval is not None:
        check_validation(cfg)
    if cfg.probe.tokens_interval is not None:
        check_probe(cfg)


def check_probe(cfg: RootConfig) -> None:
    """Capability probes during pretraining / CPT: every file and task they read exists, before any heavy work."""
    pr = cfg.probe
    parse_tokens(pr.tokens_interval, "probe.tokens_interval")
    if not pr.upstream and not pr.downstream:
        raise ConfigError("probe.tokens_interval", "is set but probe.upstream and probe.downstream are both empty; "
                                                   "e.g. probe.upstream=[piqa,arc_easy] "
                                                   "probe.downstream=[gsm8k_platinum]")
    if cfg.parallel.pp != 1:
        raise ConfigError("probe.tokens_interval",
                          f"probes run the live model with parallel.pp=1 (got pp={cfg.parallel.pp})")
    if pr.max_fraction is not None and not 0.0 < pr.max_fraction <= 1.0:
        raise ConfigError("probe.max_fraction", f"must be in (0, 1] or null, got {pr.max_fraction}")
    positive("probe.batch_size", pr.batch_size)
    once("probe.upstream", list(pr.upstream), "it would be probed twice at every point and weighed twice in "
                                              "probe_up_avg")
    once("probe.downstream", list(pr.downstream), "it would be probed twice at every point")
    if pr.upstream:
        if pr.upstream_limit is not None:
            positive("probe.upstream_limit", pr.upstream_limit)
        check_tasks(list(pr.upstream), pr.tasks_dir, pr.data_dir, prefix="probe.")
    if pr.downstream:
        positive("probe.downstream_limit", pr.downstream_limit)
        positive("probe.max_new_tokens", pr.max_new_tokens)
        if pr.scoring not in ("evolm", "strict"):
            raise ConfigError("probe.scoring", f"must be evolm or strict, got {pr.scoring!r}")
        if pr.template is not None and "{problem}" not in str(pr.template):  # as a suite's own template must
            raise ConfigError("probe.template", f"{pr.template!r} has no {{problem}}: every probe prompt would be "
                                                "this same text, asking no problem; put {problem} where the problem "
                                                "goes, or null for each suite's own template")
        for suite in pr.downstream:
            if suite not in SUITES:
                raise ConfigError("probe.downstream", f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
            if pr.downstream_dir is not None and not (Path(pr.downstream_dir) / f"{suite}.jsonl").is_file():
                raise ConfigError("probe.downstream_dir", f"missing {Path(pr.downstream_dir) / f'{suite}.jsonl'}")


class PretrainStage(Stage):
    def __init__(self, cfg: RootConfig, plan, rt):
        from megatron.core import parallel_state

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
        self.branch = wsd.resolve_branch(cfg, plan.iters) if cfg.train.branch_from else None
        if self.branch is not None:  # a WSD branch reads the stable run's dataset (its size decides megatron's order)
            samples = max(plan.iters, self.branch.stable_iters) * p.global_batch_size
        dataset = build_dataset(cfg, source, tokenizer, samples)
        self.schedule = BatchSchedule(dataset, p.global_batch_size, p.micro_batch_size,
                                      parallel_state.get_data_parallel_rank(), plan.dp, m.vocab_size)
        self.tokenizer = source.tokenizer
        self.is_main = rt.is_main
        names = source_names(cfg, source)
        self.sources = (SourceTokens(dataset, names, p.global_batch_size, m.seq_length, source.trained()[2])
                        if len(names) > 1 else None)  # per-source accounting of a blend (CPT replay)
        self.val, self.val_every, self.val_start, self.val_start_logged = {}, 0, None, False
        self.resumed, self.carried = False, {}  # restore(): a resumed run and its first run's start measurements
        if cfg.train.val_tokens_interval:  # held-out loss per source (checkpoint dynamics, forgetting in CPT)
            every = parse_tokens(cfg.train.val_tokens_interval, "train.val_tokens_interval")
            self.val_every = max(1, -(-every // plan.tokens_per_iter))
            sets = build_validation(cfg, source, tokenizer, names, cfg.train.val_batches * p.global_batch_size)
            self.val = {name: BatchSchedule(ds, p.global_batch_size, p.micro_batch_size,
                                            parallel_state.get_data_parallel_rank(), plan.dp, m.vocab_size)
                        for name, ds in sets.items()}
        self.probe = None
        if cfg.probe.tokens_interval:  # capability probes of the live model (checkpoint dynamics)
            self.probe = ProbeHook(cfg, tokenizer, plan.tokens_per_iter, rt.is_main)
        self.tokens_per_iter = plan.tokens_per_iter
        self.fpt = flops_per_token(m)
        self.branch_saves = wsd.branch_saves(cfg, plan.iters)  # a WSD stable run: {iteration: budget}

    def start(self, roles, layout):
        """A WSD cooldown branch starts from the stable run's weights, optimizer state and step count, with the
        stable run's warmup; anything else as every stage (``train.init_from`` or scratch)."""
        if self.branch is None:
            return super().start(roles, layout)
        b, role = self.branch, roles[0]
        role.scheduler = role.make_scheduler(self.plan.iters, warmup=b.warmup)
        state = ckpt.load(b.path, [role.model], role.optimizer, None, layout=layout)
        role.scheduler.step(increment=state["iteration"])
        return Start(state["iteration"], state["meta"], wsd.branch_lineage(self.cfg, b, self.lineage()),
                     f" | branching off {b.path} at iteration {state['iteration']}, cooldown to {self.plan.iters}")

    def snapshots(self, step):
        if step not in self.branch_saves:
            return []
        return [(wsd.BRANCHES, {"branch_budget": self.branch_saves[step]})]  # where that budget's cooldown starts

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

    def metrics(self, iteration, step_s, peak_flops, world_size):
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

    def restore(self, start, state):
        """A resumed run keeps the measurements its first run made before its first step (checkpoint_extra): they
        are not made again at the resume point."""
        self.resumed = bool(state)
        self.carried = state.get("dynamics_start") or {}
        missed = [f"{budget} (iteration {it:,})" for it, budget in sorted(self.branch_saves.items())
                  if self.resumed and it <= start
                  and not ckpt.is_complete(Path(self.cfg.run.out_dir) / wsd.BRANCHES / f"iter_{it:07d}")]
        if missed and self.is_main:  # listed after the run passed them: nothing can save them now
            print(f"[evolm] warning: train.branch_budgets: the branch point of {', '.join(missed)} is behind the "
                  f"resumed iteration {start:,} and was not saved; no branch can start there from this run (list "
                  "budgets before the run passes them)", file=sys.stderr, flush=True)

    def prepare(self, model, rt, start, out_dir):
        if start >= self.plan.iters:
            return
        resumed = self.resumed
        if self.val and not resumed:  # before the first step: the parent's held-out losses
            self.val_start = (start, self.heldout_loss(model, rt))
        elif self.val and self.carried.get("val"):
            begin, before = self.carried["val"]
            # logged already when a record up to the checkpoint carried it (records after it are dropped on resume)
            self.val_start = (int(begin), dict(before))
            self.val_start_logged = bool(self.carried.get("val_logged", True))
        if self.probe is not None:
            self.probe.prepare(model, start, self.carried.get("probe") if resumed else None, resumed,
                               logged=bool(self.carried.get("probe_logged", True)))

    def evaluate(self, model, rt, step, last):
        out = self._validation(model, rt, step, last)
        if self.probe is not None and self.probe.due(step, last):
            out.update(self.probe.run(model, step, last))
            if last and rt.is_main and self.probe.start is not None:
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
        return {**super().postfix(record), "tok_s": f"{record['tokens_per_s']:,.0f}"}

    def checkpoint_extra(self, step):
        extra = {"consumed_samples": step * self.cfg.parallel.global_batch_size, "tokens": step * self.tokens_per_iter}
        if self.sources is not None:
            extra["tokens_by_source"] = self.sources.tokens(step)
        carried = {}
        if self.val_start is not None:
            carried["val"] = [self.val_start[0], self.val_start[1]]
            carried["val_logged"] = self.val_start_logged
        if self.probe is not None and self.probe.start is not None:
            carried["probe"] = list(self.probe.start)
            carried["probe_logged"] = self.probe.start_logged
        # the measurements before the first step, for a resumed run's records; and whether a record up to this step
        # carries them (a resumed run drops the records after it: the first record it writes then carries them)
        if carried:
            extra["dynamics_start"] = carried
        return extra


def build(cfg: RootConfig, plan, rt) -> PretrainStage:
    return PretrainStage(cfg, plan, rt)
