"""Issue 10 item 8: scoring a row is bounded in time in both modes (towers of powers are recognised before sympy
evaluates them; a row's slow checks share one time budget), and `scoring=evolm` keeps the verdicts that the
reference evaluator finishes."""

from __future__ import annotations

import json
import time

import pytest

from evolm_nemo import answers
from evolm_nemo.answers import equiv, is_equiv, time_budget, verifier
from evolm_nemo.evaluation.score import score_row
from tests.conftest import run_evolm


def _tower_row(dollars: bool) -> dict:
    # 16 distinct answers like \boxed{9^{9^{9^{k}}}}: before the fix each comparison took ~8 s (both directions ran
    # into their 4 s timeout) and the row's 16 gold + 120 Maj@16 comparisons about 18 minutes
    wrap = "${}$" if dollars else "{}"
    answer = lambda k: wrap.format(f"9^{{9^{{9^{{{k}}}}}}}")  # noqa: E731
    return {"suite": "math", "id": "tower", "problem": "How big?", "gt_solution": None, "gt_answer": answer(3),
            "completions": [f"It grows fast, so the result is \\boxed{{{answer(k)}}}." for k in range(1, 17)]}


@pytest.mark.parametrize("mode, dollars, n_correct", [
    ("evolm", False, 16),  # the reference's quirk: a bare 9^{...} parses to the number 9 (math-verify), all equal
    ("evolm", True, 1),
    ("strict", False, 1),
    ("strict", True, 1),
])
def test_a_row_of_towers_is_scored_within_seconds(mode, dollars, n_correct):
    equiv._CACHE.clear()
    row = _tower_row(dollars)
    t0 = time.monotonic()
    out = score_row(row, mode)
    elapsed = time.monotonic() - t0
    assert elapsed < 20, elapsed
    assert sum(out["correct"]) == n_correct
    assert out["correct"][2] and out["pass16"]  # k=3 is the gold answer itself
    assert out["maj16"] == (n_correct == 16)  # 16 singletons: the first (k=1, wrong) wins the vote
    assert "unfinished_checks" not in out  # decided by the tower check, not cut by the budget


def test_huge_evaluation_estimate():
    from sympy import Integer, Pow, Symbol, factorial

    def tower(*xs):
        expr = Integer(xs[-1])
        for x in reversed(xs[:-1]):
            expr = Pow(Integer(x), expr, evaluate=False)
        return expr

    assert answers.huge_evaluation(tower(9, 9, 9))  # 3.7e8 digits
    assert answers.huge_evaluation(Symbol("x") ** tower(10, 10, 10))  # a tower in an exponent
    assert answers.huge_evaluation(factorial(Integer(10**8), evaluate=False))
    assert answers.huge_evaluation(Pow(Integer(10), Integer(10**8), evaluate=False))
    # what sympy computes within the reference's 4 s stays with sympy
    assert not answers.huge_evaluation(Pow(Integer(10), Integer(10**7), evaluate=False))  # 1e7 digits: 6.9 s here, but
    # below the cut-off: a faster machine may finish it, and the row budget bounds it anyway
    assert not answers.huge_evaluation(tower(2, 2, 2, 2))
    # 1, 0, -1: nothing to compute
    assert not answers.huge_evaluation(Pow(Integer(-1), Integer(10**1000), evaluate=False))
    assert not answers.huge_evaluation(Pow(Symbol("x"), Integer(10**9), evaluate=False))


# pairs that math-verify finishes well inside the 4 s timeout, some with big exact numbers (not e.g. 10^{10^5} vs
# 10^{100000}: evalf's cancellation runs past the timeout there, with and without the guard)
FINISHING = [
    ("$2^{100}$", "$1267650600228229401496703205376$"),
    ("$2^{2^{10}}$", "$2^{1024}$"),
    ("$(2^{10})^{3}$", "$2^{30}$"),
    ("$9^{9^{9}}$", "$9^{9^{9}}$"),
    ("$3^{4}$", "81"),
    ("$x^{2}$", "$x \\cdot x$"),
    ("$\\frac{2^{30}}{2^{29}}$", "2"),
]


@pytest.mark.parametrize("mode", ["evolm", "strict"])
def test_verdicts_that_finish_are_unchanged(mode, monkeypatch):
    from math_verify import grader

    verifier._math_verify()  # installs the guard
    guarded = [answers.slow_equiv_inprocess(mode, a, b) for a, b in FINISHING]
    for name in ("safe_sympy_doit", "simplify", "solve", "sympy_numeric_eq"):
        monkeypatch.setattr(grader, name, getattr(grader, name).__wrapped__)  # math-verify as released
    reference = [answers.slow_equiv_inprocess(mode, a, b) for a, b in FINISHING]
    assert guarded == reference
    assert all(guarded)


def test_a_time_budget_is_shared_and_not_cached():
    equiv._CACHE.clear()
    pair = ("math", "$x^{2}$", "$x \\cdot x$", "evolm")  # needs sympy
    assert answers.fast_verdict(*pair) is None
    with time_budget(0.0) as budget:
        assert is_equiv(*pair) is False  # no budget left: not run, "not equivalent"
        assert is_equiv("math", "12", "12.0") is True  # fast-path verdicts cost nothing
    assert budget.skipped == 1 and budget.unfinished == 1
    assert is_equiv(*pair) is True  # the skipped verdict was not cached
    with time_budget(30.0) as budget:
        assert is_equiv(*pair) is True
    assert budget.unfinished == 0


def test_a_row_past_its_budget_is_cut_and_reported(tmp_path):
    # 16 distinct answers that math-verify's LaTeX parser needs seconds for: with row_budget_s=1 the row ends after
    # about a second (plus a helper restart), the unfinished checks count as not equivalent and are reported
    completions = [f"\\boxed{{${'(' * (24 + k)}1{')' * (24 + k)}$}}" for k in range(16)]
    row = {"suite": "math", "id": "slow", "problem": "p", "gt_solution": None, "gt_answer": "1",
           "completions": completions}
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(row) + "\n", encoding="utf-8")
    t0 = time.monotonic()
    proc = run_evolm("score", [f"input={inp}", f"output={out}", "scoring=evolm", "row_budget_s=1", "workers=1"])
    assert time.monotonic() - t0 < 60  # includes the interpreter and helper start-up
    scored = json.loads(out.read_text(encoding="utf-8"))
    assert scored["unfinished_checks"] > 0
    assert "ran past the 1 s time budget per row" in proc.stderr and "'slow'" in proc.stderr
