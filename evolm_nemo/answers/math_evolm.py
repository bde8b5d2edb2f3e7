"""Math suites, ``evolm`` mode. Slow path: math-verify exactly as the reference calls it. Fast path: a small grammar
of strings whose math-verify parse is known exactly (a number, or nothing at all)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from evolm_nemo.answers.fast import _NOPARSE, _number_value, _numbers_fast
from evolm_nemo.answers.verifier import _cached, _math_verify

_NUM = r"(?P<num>-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"  # not "-.5": nothing is extracted
_UNIT_WORDS = r"[A-Za-z]+(?: [A-Za-z]+)*"
_EVOLM_NUMBER_FORMS = [
    # 12 | $12 | $ 12 | 1,000 | 12.5 | 12.  (a trailing full stop is ignored by math-verify's number regex)
    re.compile(rf"\s*(?:\$\s*)?{_NUM}\.?\s*", re.ASCII),
    # 12\%  (the escaped percent sign does not make it a percentage for math-verify)
    re.compile(rf"\s*(?:\$\s*)?{_NUM}\s*\\%\s*", re.ASCII),
    # 12 dollars | 12cm | $12 apples.  (letters only; not "percent"/"pct"/"answer", which math-verify treats specially)
    re.compile(rf"\s*(?:\$\s*)?{_NUM}\s*(?P<words>{_UNIT_WORDS})\.?\s*", re.ASCII),
    # 12 \text{ cm}
    re.compile(rf"\s*(?:\$\s*)?{_NUM}\s*\\text\{{\s*(?P<words>{_UNIT_WORDS})?\s*\}}\s*", re.ASCII),
    # $12$ | $-12.5$.  (inline math: latex2sympy reads the same number; no thousands commas)
    re.compile(r"\s*\$\s*(?P<num>-?[0-9]+(?:\.[0-9]+)?)\s*\$\.?\s*", re.ASCII),
]
_EVOLM_FRACTION_FORMS = [
    # 3/4 (sympy parse_expr; not "3/4.", which math-verify reads as the float 3/4.0)
    re.compile(r"\s*(?P<num>-?(?:0|[1-9][0-9]*))/(?P<den>[1-9][0-9]*)\s*", re.ASCII),
    # \frac{3}{4} | \frac{3}{4}.
    re.compile(r"\s*(?P<sign>-?)\\frac\{(?P<num>0|[1-9][0-9]*)\}\{(?P<den>[1-9][0-9]*)\}\.?\s*", re.ASCII),
]
_EVOLM_NOPARSE_FORMS = [
    re.compile(r"\s*\\\$[0-9.,]*\s*", re.ASCII),  # \$12 : no anchor before the number, nothing is extracted
    re.compile(r"\s*-?\\[dt]frac\{[0-9]+\}\{[0-9]+\}\s*", re.ASCII),  # \dfrac{1}{2} : not math-verify's fraction form
]
# math-verify extracts something only from a $ / [ / \( delimiter, a \boxed{}, a \frac{<number>}{<number>}, or a
# number / expression that starts right after the start, a space or "=" (optionally "**" and a currency sign). This
# over-approximates (e.g. "(2,4)" counts as extractable): what it rules out surely parses to nothing.
_MV_CAN_EXTRACT = re.compile(
    r"[$\[]|\\\(|\\boxed|\\frac\{|(?:^|\s|=)(?:\*\*)?[^\s\d]?[-(.]*\d"
)
_SPECIAL_WORD = re.compile(r"(?i)percent|pct|answer")


def _evolm_fast_value(s: str):
    """What ``math_verify.parse(s)`` yields, when that is known without sympy: a number value, _NOPARSE, or None."""
    if len(s) > 200:
        return None
    if not _MV_CAN_EXTRACT.search(s):
        return _NOPARSE
    for pattern in _EVOLM_NUMBER_FORMS:
        m = pattern.fullmatch(s)
        if m:
            words = m.groupdict().get("words")
            if words and _SPECIAL_WORD.search(words):
                return None
            return _number_value(m.group("num"))
    for pattern in _EVOLM_FRACTION_FORMS:
        m = pattern.fullmatch(s)
        if m:
            value = Fraction(int(m.group("num")), int(m.group("den")))
            if m.groupdict().get("sign"):
                value = -value
            return ("frac", value, 0, 0)
    for pattern in _EVOLM_NOPARSE_FORMS:
        if pattern.fullmatch(s):
            return _NOPARSE
    return None


def _evolm_math_fast(a: str, b: str) -> Optional[bool]:
    return _numbers_fast(_evolm_fast_value(a), _evolm_fast_value(b))


def _evolm_math_direction(a: str, b: str) -> bool:
    """One direction of the reference's ``latex_equiv``: ``verify(parse(a), parse(b))``, any exception -> False."""
    mv = _math_verify()
    try:
        return bool(mv["verify"](_cached("evolm", a, mv["parse"]), _cached("evolm", b, mv["parse"])))
    except Exception:
        return False
