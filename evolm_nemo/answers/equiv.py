"""Equivalence: the fast path (pure Python, only where it provably agrees with the sympy path of the same mode;
tests/evaluation check this differentially), a cache per (mode, pair), else the sympy path in a helper process
under the caller's time budget."""

from __future__ import annotations

import time
from typing import Optional

from evolm_nemo.answers.budget import _BUDGET, MIN_CHECK_S
from evolm_nemo.answers.common import _STATS, TIMEOUT_S, _check_mode, _check_suite
from evolm_nemo.answers.crux import _crux_equiv_evolm, _crux_equiv_strict
from evolm_nemo.answers.extract import extract_answer
from evolm_nemo.answers.math_evolm import _evolm_math_fast
from evolm_nemo.answers.math_strict import _strict_math_fast
from evolm_nemo.answers.nli import nli_label
from evolm_nemo.answers.pool import _POOL

_CACHE: dict = {}
_CACHE_MAX = 200_000


def _math_equiv(a: str, b: str, mode: str) -> bool:
    fast = _evolm_math_fast(a, b) if mode == "evolm" else _strict_math_fast(a, b)
    if fast is not None:
        _STATS["fast"] += 1
        return fast
    key = (mode, a, b) if a <= b else (mode, b, a)
    hit = _CACHE.get(key)
    if hit is not None:
        _STATS["cached"] += 1
        return hit
    budget = getattr(_BUDGET, "current", None)
    timeout = TIMEOUT_S
    if budget is not None and budget.deadline is not None:
        left = budget.deadline - time.monotonic()
        if left < MIN_CHECK_S:
            _STATS["over_budget"] += 1
            budget.skipped += 1
            return False
        timeout = min(TIMEOUT_S, left / 2)
    _STATS["slow"] += 1
    verdict, timed_out = _POOL.check(mode, a, b, timeout)
    if timed_out and timeout < TIMEOUT_S:  # cut short by the budget: not the full check's verdict, not cached
        budget.cut += 1
        return verdict
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.clear()
    _CACHE[key] = verdict
    return verdict


def is_equiv(suite: str, pred: Optional[str], gold: str, mode: str = "evolm") -> bool:
    """Whether answer `pred` is equivalent to `gold` under `suite`'s rule in `mode`. None / empty / non-string
    answers are never equivalent. Bounded in time (a timeout is "not equivalent") and safe from any thread."""
    kind = _check_suite(suite)
    _check_mode(mode)
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred or not gold:
        return False
    if kind == "nli":
        la, lb = nli_label(pred, mode), nli_label(gold, mode)
        return la is not None and la == lb
    if kind == "crux":
        return _crux_equiv_evolm(pred, gold) if mode == "evolm" else _crux_equiv_strict(pred, gold)
    return _math_equiv(pred, gold, mode)


def judge(suite: str, completion: str, gold: str, mode: str = "evolm") -> bool:
    """Extract the answer of a completion (in `mode`'s extraction) and check it against the gold answer."""
    return is_equiv(suite, extract_answer(completion, mode), gold, mode)


def fast_verdict(suite: str, pred: Optional[str], gold: str, mode: str = "evolm") -> Optional[bool]:
    """The verdict when it is known without sympy (None: the slow path would be needed). For tests and benchmarks."""
    kind = _check_suite(suite)
    _check_mode(mode)
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred or not gold:
        return False
    if kind != "math":
        return is_equiv(suite, pred, gold, mode)
    return _evolm_math_fast(pred, gold) if mode == "evolm" else _strict_math_fast(pred, gold)


def stats() -> dict:
    """Counts of fast / slow / cached math checks so far in this process."""
    return dict(_STATS)
