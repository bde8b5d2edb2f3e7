"""Towers of powers and huge numbers. math-verify evaluates exact numbers with sympy's doit() / simplify() / solve():
``9^{9^{9}}`` is an integer of 3.7e8 digits whose computation runs for minutes in C (no signal interrupts it). A
cheap walk over the parsed expression estimates how many digits such an evaluation would produce; past
HUGE_DIGITS the evaluation is cut off where math-verify would start it, with math-verify's own TimeoutException,
i.e. exactly what the reference evaluator's timeout does to that comparison (its other comparisons, such as the
string comparison, still run). HUGE_DIGITS is far beyond what finishes inside TIMEOUT_S (on the 2-core CPU box
computing a power of 1e7 digits takes 6.9 s, 3e7 digits about 35 s), so no verdict that the reference evaluator
finishes changes.
"""

from __future__ import annotations

from typing import Optional

from evolm_nemo.answers.common import _STATS

HUGE_DIGITS = 3e7
_HUGE_MAX_NODES = 5000


def _exact_digits(expr, depth: int = 0) -> Optional[float]:
    """Estimate (log10, an upper bound up to float rounding) of the larger of numerator and denominator of the exact
    value of `expr`, when it is built from rationals with +, -, *, /, ** and factorial (None otherwise: symbols,
    floats, functions, ...)."""
    import math

    from sympy import Add, Mul, Pow, Rational
    from sympy.functions.combinatorial.factorials import factorial

    if depth > 50:
        return None
    if isinstance(expr, Rational):
        return _log10_int(max(abs(int(expr.p)), abs(int(expr.q)), 1))
    if isinstance(expr, (Add, Mul)):
        parts = [_exact_digits(a, depth + 1) for a in expr.args]
        if any(p is None for p in parts):
            return None
        return sum(parts) + (math.log10(len(parts)) if isinstance(expr, Add) else 0.0)
    if isinstance(expr, Pow):
        base = _exact_digits(expr.args[0], depth + 1)
        exponent = _exponent_bound(expr.args[1], depth + 1)
        if base is None or exponent is None:
            return None
        return 0.0 if base == 0.0 else base * exponent  # 0, 1, -1: nothing to compute
    if isinstance(expr, factorial):
        n = _exponent_bound(expr.args[0], depth + 1)
        return None if n is None else n * math.log10(max(n, 2.0))
    return None


def _log10_int(n: int) -> float:
    import math

    if n.bit_length() < 1000:
        return math.log10(n)
    return n.bit_length() * 0.30103


def _exponent_bound(expr, depth: int) -> Optional[float]:
    """Estimate of |value| of an exact exponent (inf when it has too many digits to say)."""
    from sympy import Rational

    if isinstance(expr, Rational):
        return abs(float(expr.p)) / float(expr.q) if abs(expr.p).bit_length() < 1000 else float("inf")
    digits = _exact_digits(expr, depth)
    if digits is None:
        return None
    return 10.0 ** digits if digits < 300 else float("inf")


def huge_evaluation(expr) -> bool:
    """Whether evaluating `expr` exactly (sympy doit) would build a number of more than HUGE_DIGITS digits: some
    power or factorial of exact numbers in it is that large. A bounded, pure-Python walk (no evaluation)."""
    from sympy import Basic, Pow
    from sympy.functions.combinatorial.factorials import factorial

    try:
        stack, seen = [expr], 0
        while stack and seen < _HUGE_MAX_NODES:
            node = stack.pop()
            seen += 1
            if isinstance(node, (list, tuple)):
                stack.extend(node)
                continue
            if not isinstance(node, Basic):
                if hasattr(node, "flat"):  # matrices
                    stack.extend(list(node.flat()) if callable(node.flat) else [])
                continue
            if isinstance(node, (Pow, factorial)):
                digits = _exact_digits(node)
                if digits is not None and digits > HUGE_DIGITS:
                    return True
            stack.extend(node.args)
    except Exception:  # noqa: BLE001 - an estimate that fails says nothing
        return False
    return False


_GUARDED = False


def _guard_huge_evaluation() -> None:
    """Wrap math-verify's evaluation entry points (doit, simplify, solve) so that a huge evaluation raises
    math-verify's TimeoutException instead of running (see HUGE_DIGITS)."""
    global _GUARDED
    if _GUARDED:
        return
    from math_verify import grader
    from math_verify.errors import TimeoutException

    def guard(fn):
        def guarded(*args, **kwargs):
            if any(huge_evaluation(a) for a in args[:2]):
                _STATS["huge"] += 1
                raise TimeoutException("huge exact evaluation (a tower of powers or a huge number)")
            return fn(*args, **kwargs)

        guarded.__wrapped__ = fn
        return guarded

    for name in ("safe_sympy_doit", "simplify", "solve"):
        setattr(grader, name, guard(getattr(grader, name)))

    numeric_eq = grader.sympy_numeric_eq

    def guarded_numeric_eq(a, b, *args, **kwargs):
        # its numeric branch evaluates (a - b).evalf(): a tower there makes mpmath raise its precision for minutes
        # (exact numbers go through doit, guarded above); a difference that cancels to something small is fine
        try:
            difference = a - b
        except Exception:  # noqa: BLE001 - math-verify will meet the same error and handle it
            difference = None
        if difference is not None and huge_evaluation(difference):
            _STATS["huge"] += 1
            raise TimeoutException("huge numeric evaluation (a tower of powers or a huge number)")
        return numeric_eq(a, b, *args, **kwargs)

    guarded_numeric_eq.__wrapped__ = numeric_eq
    grader.sympy_numeric_eq = guarded_numeric_eq
    _GUARDED = True
