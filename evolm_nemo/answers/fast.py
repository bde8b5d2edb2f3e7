"""Exact values of plain numerals and integer fractions for the math fast paths of both modes, and when comparing
two such values is what the sympy path would conclude."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from typing import Optional

# Value kinds of the fast grammar: ("int" | "frac" | "dec", Fraction, digits) ; _NOPARSE: math-verify extracts nothing.
_NOPARSE = "noparse"


def _number_value(num: str):
    """("int" | "dec", exact value, significant digits) of a plain decimal numeral with optional thousands commas."""
    num = num.replace(",", "")
    if num.lstrip("-").startswith("."):
        num = num.replace(".", "0.", 1)
    digits = num.lstrip("-")
    value = Fraction(Decimal(num))
    intpart, _, decpart = digits.partition(".")
    sig = len(intpart.lstrip("0")) + len(decpart)
    if decpart:
        return ("dec", value, sig, len(decpart))
    return ("int", value, sig, 0)


def _safe_pair(va, vb) -> bool:
    """Pairs of fast values whose math-verify verdict is plain value equality: exact (integer / integer fraction)
    values, or decimals with at most 6 decimals and 15 significant digits (math-verify compares floats rounded to 6
    decimals at 15-digit precision) against decimals or integers within the same precision."""
    kinds = {va[0], vb[0]}
    if "dec" not in kinds:
        return True
    if "frac" in kinds:
        return False
    return all(v[2] <= 15 and v[3] <= 6 for v in (va, vb))


def _numbers_fast(va, vb) -> Optional[bool]:
    if va is _NOPARSE or vb is _NOPARSE:
        return False
    if va is None or vb is None or not _safe_pair(va, vb):
        return None
    return va[1] == vb[1]
