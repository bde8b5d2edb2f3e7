"""Math suites, ``strict`` mode: normalise, compare as text, then as one delimited LaTeX expression."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from evolm_nemo.answers.fast import _number_value, _numbers_fast
from evolm_nemo.answers.verifier import _cached, _math_verify

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_STRICT_REMOVE = [
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "),
    ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""),
    ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("~", " "),
]
_FRAC_SHORT = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])")  # \frac65 -> \frac{6}{5}
_FRAC_HALF = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*\{")  # \frac6{5} -> \frac{6}{5}
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")  # \sqrt3 -> \sqrt{3}
_AM_PM = re.compile(r"(?i)(?<=[0-9] )([ap])\.? ?m\b\.?")  # 8:30 A.M. / 8:30 am -> 8:30 am
_STRICT_NUM = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+", re.ASCII)
_STRICT_UNITS = re.compile(  # 12 cm, 3.5 square feet.
    r"(?P<num>-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+)"
    r"\s*(?P<unit>[A-Za-z]+(?:[ .][A-Za-z]+)*)\.?",
    re.ASCII,
)
_STRICT_ASSIGN = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?P<rhs>[^=]+)")
_STRICT_FRACTION = [
    re.compile(r"(?P<sign>-?)(?P<num>0|[1-9][0-9]*)/(?P<den>[1-9][0-9]*)", re.ASCII),
    re.compile(r"(?P<sign>-?)\\frac\{(?P<num>0|[1-9][0-9]*)\}\{(?P<den>[1-9][0-9]*)\}", re.ASCII),
]
_STRICT_MAX_LEN = 2000  # longer answers are not normalised
_STRICT_SYMPY_MAX_LEN = 400  # longer normalised answers compare as text only


def _strip_outer_braces(s: str) -> str:
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0 and i < len(s) - 1:
                return s  # "{a}{b}": the outer braces are not one group
        s = s[1:-1].strip()
    return s


def strict_normalize(s: str) -> str:
    """Canonical surface form of a math answer for strict mode (pure string work, no sympy)."""
    s = s.strip()
    if len(s) > _STRICT_MAX_LEN:
        return s
    for delim_open, delim_close in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(delim_open) and s.endswith(delim_close):
            s = s[len(delim_open) : -len(delim_close)].strip()
    for old, new in _STRICT_REMOVE:
        s = s.replace(old, new)
    s = s.replace("\n", " ")
    for _ in range(3):  # \text{\text{x}} and friends
        s2 = _TEXT_CMD.sub(lambda m: m.group(1), s)
        if s2 == s:
            break
        s = s2
    s = _FRAC_HALF.sub(r"\\frac{\1}{", _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s))
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _AM_PM.sub(lambda m: m.group(1).lower() + "m", s)
    s = _strip_outer_braces(s)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _STRICT_ASSIGN.fullmatch(s)
    if m:
        s = m.group("rhs").strip()
    m = _STRICT_UNITS.fullmatch(s)
    if m and not re.fullmatch(r"(?i)(?:e|i|pi|x|y|z|n|k|am|pm)", m.group("unit")):
        s = m.group("num")
    if _STRICT_NUM.fullmatch(s):
        s = s.replace(",", "")
    return s


_LATEX_CMD = re.compile(r"\\[A-Za-z]+")
_WORD3 = re.compile(r"[A-Za-z]{3,}")
_MATH_WORDS = frozenset(
    "sin cos tan cot sec csc arcsin arccos arctan sinh cosh tanh log ln exp sqrt inf infty min max gcd lcm mod det"
    .split()
)
_CLOCK = re.compile(r"[0-9]:[0-9]{2}|[0-9] [ap]m\b")  # 8:30, 10 am (after strict_normalize)


def _not_an_expression(s: str) -> bool:
    """Strict mode compares these as text only: words (a run of 3+ letters that is not a function name, outside LaTeX
    commands: sympy would read "listen" and "silent" as equal products of symbols), clock times, too long,
    unbalanced braces / brackets, or nested too deep."""
    if len(s) > _STRICT_SYMPY_MAX_LEN or s.count("{") != s.count("}"):
        return True
    if _CLOCK.search(s) or any(w.lower() not in _MATH_WORDS for w in _WORD3.findall(_LATEX_CMD.sub(" ", s))):
        return True
    if s.count("(") + s.count("[") != s.count(")") + s.count("]"):
        return True
    depth = deepest = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}":
            depth -= 1
    return deepest > 24


def _text_key(s: str) -> str:
    """Case and spacing do not matter (LaTeX ignores spaces in math; "Thursday" is "thursday")."""
    return re.sub(r"\s+", "", s).lower()


def _strict_fast_value(s: str):
    """Exact value of a normalised answer that is a plain number or an integer fraction; None otherwise."""
    if len(s) > 200:
        return None
    if _STRICT_NUM.fullmatch(s):
        num = s if not s.lstrip("-").startswith(".") else s.replace(".", "0.", 1)
        return _number_value(num)
    for pattern in _STRICT_FRACTION:
        m = pattern.fullmatch(s)
        if m:
            value = Fraction(int(m.group("num")), int(m.group("den")))
            return ("frac", -value if m.group("sign") else value, 0, 0)
    return None


def _strict_prelude(a: str, b: str):
    """What both strict paths decide before any number or sympy work: (verdict or None, normalized a, b)."""
    na, nb = strict_normalize(a), strict_normalize(b)
    if not na or not nb:
        return False, na, nb
    if _text_key(na) == _text_key(nb):
        return True, na, nb
    if _not_an_expression(na) or _not_an_expression(nb):
        return False, na, nb  # too long or unbalanced: not a math answer, do not spend time parsing garbage
    return None, na, nb


def _strict_math_fast(a: str, b: str) -> Optional[bool]:
    verdict, na, nb = _strict_prelude(a, b)
    if verdict is not None:
        return verdict
    return _numbers_fast(_strict_fast_value(na), _strict_fast_value(nb))


def _strict_parse(s: str):
    mv = _math_verify()
    latex = "$" + s.replace("$", "") + "$"
    return mv["parse"](latex, extraction_config=[mv["latex"]()], fallback_mode="no_fallback")


def _strict_math_direction(a: str, b: str) -> bool:
    """One direction of strict math equivalence (the slow path; includes the text comparison)."""
    verdict, na, nb = _strict_prelude(a, b)
    if verdict is not None:
        return verdict
    mv = _math_verify()
    try:
        pa, pb = _cached("strict", na, _strict_parse), _cached("strict", nb, _strict_parse)
        return bool(pa) and bool(pb) and bool(mv["verify"](pa, pb))
    except Exception:
        return False
