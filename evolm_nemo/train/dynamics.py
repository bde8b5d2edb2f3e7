"""Checkpoint dynamics while training: the capability probes (evaluation/probe.py) on a token schedule, with their
cost logged and bounded.

``probe.tokens_interval=T``: the probes run before the first step (keys suffixed ``_at_<iteration>`` in the first
record), every ``ceil(T / tokens_per_iter)`` iterations and after the last step. Each record with probes carries
``probe_s`` (that probe's wall time, the slowest rank's), ``probe_fraction`` (all probes' time so far over the wall
time since the run, or its resume, began) and ``probes_skipped``. With ``probe.max_fraction=f`` an interval's probe is
skipped when running it (at the last probe's cost) would lift that share above ``f`` -- one line says so when
skipping starts -- and probing resumes once training has caught up; the final probe always runs. The decision is
taken from all-reduced times, so every rank agrees.
"""

from __future__ import annotations

import contextlib
import time

from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import parse_tokens


class ProbeHook:
    def __init__(self, cfg: RootConfig, tokenizer, tokens_per_iter: int, is_main: bool):
        from evolm_nemo.evaluation import probe
        from evolm_nemo.evaluation import upstream as up

        pr = self.cfg = cfg.probe
        self.every = max(1, -(-parse_tokens(pr.tokens_interval, "probe.tokens_interval") // tokens_per_iter))
        self.tokenizer, self.is_main = tokenizer, is_main
        self.max_seq = cfg.model.seq_length
        self.tasks_dir = up.tasks_dir_for(pr.tasks_dir, pr.data_dir)
        # problems are read now: a bad file fails in one line before the model is built
        self.problems = [probe.fitting(probe.load_problems(s, pr.downstream_dir, pr.downstream_limit, pr.template),
                                       tokenizer, self.max_seq, pr.max_new_tokens, is_main) for s in pr.downstream]
        self.next, self.start, self.start_logged = None, None, False
        self.t0 = self.spent = self.last_cost = 0.0
        self.skipped, self.skipping = 0, False

    def measure(self, model) -> dict:
        """The probes' scores (percent) on the live model; every rank calls it with the same inputs. Training's
        random state is left as it was (lm-eval seeds python, numpy and torch itself)."""
        with _rng_kept():
            return self._measure(model)

    def _measure(self, model) -> dict:
        from evolm_nemo.evaluation import probe

        pr, out = self.cfg, {}
        if pr.upstream:
            summary = probe.upstream(model, self.tokenizer, pr.upstream, self.tasks_dir, pr.data_dir,
                                     pr.upstream_limit, self.max_seq, pr.batch_size)
            out.update({f"probe_up_{t}": summary["tasks"][t]["score"] for t in pr.upstream})
            out["probe_up_avg"] = summary["avg"]
        for problems in self.problems:
            acc, _ = probe.downstream(model, self.tokenizer, problems, pr.max_new_tokens, self.max_seq, pr.scoring,
                                      pr.batch_size)
            out[f"probe_down_{problems.suite}"] = round(100.0 * acc, 2)
        return out

    def prepare(self, model, start: int, carried=None, resumed: bool = False, logged: bool = True) -> None:
        """Before the first step: the starting point of the curve (the parent's). A resumed run takes the one its
        first run measured (``carried``, from the checkpoint) instead of measuring at the resume point, and probes
        at the same multiples of the interval as the uninterrupted run. ``logged``: whether a record up to the
        checkpoint carries that starting point (else the resumed run's first probe record does)."""
        self.t0 = time.perf_counter()
        if resumed:
            self.start = (int(carried[0]), dict(carried[1]), float(carried[2])) if carried else None
            self.spent = self.last_cost = 0.0
            self.start_logged = logged
        else:
            self.start = (start, self.measure(model), _slowest(time.perf_counter() - self.t0))
            self.spent = self.last_cost = self.start[2]
        self.next = (start // self.every + 1) * self.every

    def due(self, step: int, last: bool) -> bool:
        """Whether to probe after ``step``: at every interval while the probes' share of the wall time since the
        run (or its resume) began stays within ``probe.max_fraction`` (counting the probe about to run at the last
        one's cost); always after the last step. Collective at interval steps (every rank decides from the same
        numbers)."""
        if last:
            return True
        if self.next is None or step < self.next:
            return False
        self.next = (step // self.every + 1) * self.every
        f = self.cfg.max_fraction
        if f is None:
            return True
        elapsed = _slowest(time.perf_counter() - self.t0)
        if self.spent + self.last_cost <= f * (elapsed + self.last_cost):
            self.skipping = False
            return True
        self.skipped += 1
        if self.is_main and not self.skipping:
            print(f"[evolm] probe skipped at iteration {step}: probes would take more than probe.max_fraction={f} of "
                  f"the wall time ({self.spent:.1f} s of {elapsed:.1f} s so far, about {self.last_cost:.1f} s each); "
                  "they resume when training has caught up, and the last step always probes", flush=True)
        self.skipping = True
        return False

    def run(self, model, step: int, last: bool) -> dict:
        t0 = time.perf_counter()
        out = self.measure(model)
        cost = _slowest(time.perf_counter() - t0)
        self.spent += cost
        self.last_cost = cost
        out.update(probe_s=round(cost, 4), probe_fraction=round(self.spent / max(time.perf_counter() - self.t0, 1e-9),
                                                                4), probes_skipped=self.skipped)
        if self.start is not None and not self.start_logged:
            begin, before, begin_s = self.start
            out.update({f"{k}_at_{begin}": v for k, v in before.items()})
            out[f"probe_s_at_{begin}"] = round(begin_s, 4)
            self.start_logged = True
        return out


@contextlib.contextmanager
def _rng_kept():
    import random

    import numpy as np
    import torch

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def _slowest(seconds: float) -> float:
    """The largest value over all ranks (one schedule for everyone)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = torch.tensor([seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())
    return seconds
