"""Checkpoint dynamics while training: the capability probes (evaluation/probe.py) on a token schedule, with their
cost logged and bounded.

``probe.tokens_interval=T``: the probes run before the first step (keys suffixed ``_at_<iteration>`` in the first
record), every ``ceil(T / tokens_per_iter)`` iterations and after the last step. Each record with probes carries
``probe_s`` (the probe's wall time, the slowest rank's) and ``probe_fraction`` (``probe_s`` over the wall time since
the previous probe ended, probe included). With ``probe.max_fraction=f`` a probe that costs more than ``f`` of that
time postpones the next one until enough training has happened for the ratio to be ``f`` again (printed once per
change); the final probe always runs. The decision is taken from an all-reduced time, so every rank agrees.
"""

from __future__ import annotations

import contextlib
import math
import time

from evolm_nemo.config.schema import RootConfig
from evolm_nemo.config.tokens import parse_tokens


class ProbeHook:
    def __init__(self, cfg: RootConfig, tokenizer, tokens_per_iter: int, is_main: bool):
        from evolm_nemo.evaluation import probe

        pr = self.cfg = cfg.probe
        self.every = max(1, -(-parse_tokens(pr.tokens_interval, "probe.tokens_interval") // tokens_per_iter))
        self.tokenizer, self.is_main = tokenizer, is_main
        self.max_seq = cfg.model.seq_length
        self.tasks_dir = probe.tasks_dir_for(pr.tasks_dir, pr.data_dir)
        # problems are read now: a bad file fails in one line before the model is built
        self.problems = [probe.fitting(probe.load_problems(s, pr.downstream_dir, pr.downstream_limit, pr.template),
                                       tokenizer, self.max_seq, pr.max_new_tokens, is_main) for s in pr.downstream]
        self.next, self.prev, self.since, self.start, self.start_logged = None, 0, None, None, False

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

    def prepare(self, model, start: int) -> None:
        """Before the first step: the starting point of the curve (the parent's, or the resumed checkpoint's)."""
        t0 = time.perf_counter()
        self.start = (start, self.measure(model), _slowest(time.perf_counter() - t0))
        self.next, self.prev, self.since = start + self.every, start, time.perf_counter()

    def due(self, step: int, last: bool) -> bool:
        return last or (self.next is not None and step >= self.next)

    def run(self, model, step: int, last: bool) -> dict:
        t0 = time.perf_counter()
        trained = t0 - self.since
        out = self.measure(model)
        cost = _slowest(time.perf_counter() - t0)
        fraction = cost / max(cost + trained, 1e-9)
        out.update(probe_s=round(cost, 4), probe_fraction=round(fraction, 4))
        if self.start is not None and not self.start_logged:
            begin, before, begin_s = self.start
            out.update({f"{k}_at_{begin}": v for k, v in before.items()})
            out[f"probe_s_at_{begin}"] = round(begin_s, 4)
            self.start_logged = True
        gap = self.every
        f = self.cfg.max_fraction
        if f is not None and fraction > f and step > 0:
            per_step = trained / max(step - self.prev, 1)  # training seconds per iteration lately
            need = cost * (1.0 - f) / f  # training time that makes this probe's share f
            gap = max(self.every, math.ceil(need / max(per_step, 1e-9)))
            if self.is_main and not last:
                print(f"[evolm] probe took {cost:.1f} s ({fraction:.0%} of the last {cost + trained:.1f} s, over "
                      f"probe.max_fraction={f}); next probe at iteration {step + gap} instead of {step + self.every}",
                      flush=True)
        self.next, self.prev, self.since = step + gap, step, time.perf_counter()
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
