"""Math suites, ``strict`` mode: normalise, compare as text, check that both answers have the same form (an equation
only matches an equation, a tuple a tuple, a set a set, a matrix a matrix), then compare as what they are: matrices
entry by entry, equations as relations, everything else as one delimited LaTeX expression (math-verify)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

from evolm_nemo.answers.fast import _number_value, _numbers_fast
from evolm_nemo.answers.guards import huge_evaluation
from evolm_nemo.answers.verifier import _cached, _math_verify

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
# a unit after an answer: 5 \text{ cm}, \frac{1}{3} \text{meters}, 15\mbox{ cm}^2 (MATH's normalisation drops these)
_UNIT_TEXT = re.compile(
    r"\s*\\(?:text|textnormal|textrm|textit|mbox|mathrm)\s*\{(?P<word>\s*[A-Za-z][A-Za-z. ]*)\}(?:\^\{?[23]\}?)?\s*\.?$"
)
_THOUSANDS_BANG = re.compile(r"(?<=[0-9]),\\!\s*(?=[0-9]{3}(?![0-9]))")  # 32,\! 349 -> 32,349
_SPACE_CMD = re.compile(r"(?<!\\)\\ ")  # "\ " is a space, "\\ " a matrix row break followed by one
_STRICT_REMOVE = [
    ("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
    ("\\displaystyle", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""),
    ("\\$", ""), ("$", ""), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("{,}", ","), ("~", " "),
]
_FRAC_SHORT = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])")  # \frac65 -> \frac{6}{5}
_FRAC_HALF = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*\{")  # \frac6{5} -> \frac{6}{5}
_SQRT_SHORT = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")  # \sqrt3 -> \sqrt{3}
_AM_PM = re.compile(r"(?i)(?<=[0-9]) ?([ap])\.? ?m\b\.?")  # 8:30 A.M. / 8:30am / 8:30 am -> 8:30 am
_STRICT_NUM = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+", re.ASCII)
_STRICT_UNITS = re.compile(  # 12 cm, 3.5 square feet., \frac{1}{3} meters
    r"(?P<num>-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|-?\.[0-9]+"
    r"|-?\\frac\{[0-9]+\}\{[0-9]+\}|-?[0-9]+/[0-9]+)"
    r"\s*(?P<unit>[A-Za-z]+(?:[ .][A-Za-z]+)*(?:\^\{?[23]\}?)?)\.?",  # cm^2, m^{3}
    re.ASCII,
)
_STRICT_ASSIGN = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*(?P<rhs>[^=]+)")
_STRICT_FUNC_DEF = re.compile(r"[A-Za-z](?:\^\{?-1\}?)?\([^()=]*\)\s*=\s*(?P<rhs>[^=]+)")  # f(x) = 2x+3, f^{-1}(4) = 1
_VARIABLE = re.compile(r"(?<![A-Za-z])[A-Za-df-hj-z](?![A-Za-z])|[A-Za-z]{2,}")  # letters, not the constants e, i
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
    while len(s) > 4 and s[:2] in ("**", "__") and s.endswith(s[:2]):  # markdown bold: **18**
        s = s[2:-2].strip()
    for delim_open, delim_close in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(delim_open) and s.endswith(delim_close):
            s = s[len(delim_open) : -len(delim_close)].strip()
    s = _THOUSANDS_BANG.sub(",", s)
    for old, new in _STRICT_REMOVE:
        s = s.replace(old, new)
    s = _SPACE_CMD.sub(" ", s.replace("\n", " "))
    s = _strip_unit_text(s)
    for _ in range(3):  # \text{\text{x}} and friends
        s2 = _TEXT_CMD.sub(lambda m: m.group(1), s)
        if s2 == s:
            break
        s = s2
    s = _FRAC_HALF.sub(r"\\frac{\1}{", _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s))
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = _AM_PM.sub(lambda m: " " + m.group(1).lower() + "m", s)
    s = _strip_outer_braces(s)
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].rstrip()
    m = _STRICT_FUNC_DEF.fullmatch(s)
    if m:  # f(x) = 2x+3 is the function 2x+3
        s = m.group("rhs").strip()
    m = _STRICT_ASSIGN.fullmatch(s)
    if m:  # x = 5 is the value 5; y = 2x+3 (a variable on the right) stays an equation
        rhs = _strip_units(m.group("rhs").strip())
        if not _VARIABLE.search(_LATEX_CMD.sub(" ", rhs)):
            s = rhs
    s = _strip_units(s)
    if _STRICT_NUM.fullmatch(s):
        s = s.replace(",", "")
    return s


def _strip_units(s: str) -> str:
    """12 cm, 3.5 square feet -> the number (not 3 e, 2 i, 5 pi, 10 am: a constant, a variable or a clock time)."""
    m = _STRICT_UNITS.fullmatch(s)
    if m and not re.fullmatch(r"(?i)(?:e|i|pi|x|y|z|n|k|am|pm)", m.group("unit")):
        return m.group("num")
    return s


def _strip_unit_text(s: str) -> str:
    """Drop unit text after an answer, as MATH's normalisation does: ``\\frac{1}{3} \\text{meters}``,
    ``125\\textnormal{ miles}``, ``15\\mbox{ cm}^2``. A lone text (``\\text{Thursday}``) is the answer itself and a
    one-letter text without a leading space (``2\\mathrm{x}``) may be a variable: both are kept."""
    for _ in range(2):  # 5 \text{ ft} \text{ long}
        m = _UNIT_TEXT.search(s)
        if m is None or not s[: m.start()].strip():
            break
        word = m.group("word")
        if sum(ch.isalpha() for ch in word) < 2 and not word[0].isspace():
            break
        s = s[: m.start()].rstrip()
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
    """Spacing does not matter (LaTeX ignores spaces in math) except between two digits that are not a thousands
    group ("2 1/2" is no "21/2", "1 2" no "12"; "1 000" is "1000"); case does not matter in words ("Thursday" is
    "thursday")."""
    s = _THOUSANDS_SPACE.sub("", s)
    return re.sub(r"\s+", "", re.sub(r"(?<=\d)\s+(?=\d)", "\x00", s)).replace("\x00", " ").lower()


_THOUSANDS_SPACE = re.compile(r"(?<=\d)\s(?=\d{3}(?![\d/]))")


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


_MATRIX = re.compile(r"\\begin\{(?P<env>[pbvBV]?matrix)\}(?P<body>.*)\\end\{(?P=env)\}", re.DOTALL)
_COLLECTIONS = ("set", "list")


def _shape(s: str) -> str:
    """The form of a normalised answer, from its surface: "matrix" (``\\begin{pmatrix}..``), "set" (``\\{..\\}``),
    "paren" (a tuple or interval: ``(3,1)``, ``[0,7)``), "list" (``1, 3``), "eq" (an equation: one ``=`` outside
    brackets) or "expr"."""
    if s.startswith("\\begin") and _MATRIX.fullmatch(s):
        return "matrix"
    depth, commas, equals, closed_at = 0, 0, 0, -1
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0 and closed_at < 0:
                closed_at = i
        elif ch == "," and depth == 0:
            commas += 1
        elif ch == "=" and depth == 0 and (i == 0 or s[i - 1] not in "<>!"):
            equals += 1
    if commas:
        return "list"
    last = len(s) - 1
    if s.startswith("\\{") and s.endswith("\\}") and closed_at == last:
        return "set"
    if s[:1] in "([" and s[-1:] in ")]" and closed_at == last and _top_level_split(s[1:-1], ","):
        return "paren"
    return "eq" if equals == 1 else "expr"


def _top_level_split(s: str, sep: str) -> list[str]:
    """`s` split at `sep` outside brackets and braces ([] when there is no such `sep`)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            start = i + len(sep)
            i = start
            continue
        i += 1
    return parts + [s[start:]] if parts else []


def _matrix_entries(s: str) -> list[list[str]]:
    body = _MATRIX.fullmatch(s).group("body").strip()
    rows = _top_level_split(body, "\\\\") or [body]
    if len(rows) > 1 and not rows[-1].strip():
        rows = rows[:-1]  # a trailing row break
    return [[strict_normalize(x) for x in (_top_level_split(r, "&") or [r])] for r in rows]


def _strict_prelude(a: str, b: str):
    """What both strict paths decide before any number or sympy work: (verdict or None, normalized a, b, their shape).
    Forms must agree: an equation only matches an equation (``a^2+b=0`` is not ``0``), a tuple or interval only a
    tuple or interval (a bare list ``3, 1`` is read as the tuple ``(3, 1)``), a set a set or a list, a matrix a
    matrix."""
    na, nb = strict_normalize(a), strict_normalize(b)
    if not na or not nb:
        return False, na, nb, None
    if _text_key(na) == _text_key(nb):
        return True, na, nb, None
    ka, kb = _shape(na), _shape(nb)
    if ka != kb:
        if {ka, kb} == {"paren", "list"}:
            na, nb = (f"({na})" if ka == "list" else na), (f"({nb})" if kb == "list" else nb)
            if _text_key(na) == _text_key(nb):
                return True, na, nb, None
            ka = kb = "paren"
        elif not (ka in _COLLECTIONS and kb in _COLLECTIONS):
            if "eq" in (ka, kb) or "matrix" in (ka, kb) or ("paren" in (ka, kb) and {ka, kb} & set(_COLLECTIONS)):
                return False, na, nb, None
    if ka == kb == "matrix":
        return None, na, nb, "matrix"
    if _not_an_expression(na) or _not_an_expression(nb):
        return False, na, nb, None  # too long or unbalanced: not a math answer, do not spend time parsing garbage
    return None, na, nb, ("eq" if ka == kb == "eq" else "expr")


def _matrix_equiv(na: str, nb: str, entry_equiv) -> Optional[bool]:
    """Matrices and vectors: the same shape, then entry by entry (None: some entry is undecided by `entry_equiv`)."""
    ea, eb = _matrix_entries(na), _matrix_entries(nb)
    if [len(r) for r in ea] != [len(r) for r in eb]:
        return False
    verdict = True
    for x, y in zip((x for r in ea for x in r), (y for r in eb for y in r)):
        v = entry_equiv(x, y)
        if v is False:
            return False
        if v is None:
            verdict = None
    return verdict


def _strict_math_fast(a: str, b: str) -> Optional[bool]:
    verdict, na, nb, shape = _strict_prelude(a, b)
    if verdict is not None:
        return verdict
    if shape == "matrix":
        return _matrix_equiv(na, nb, _strict_math_fast)
    if shape == "eq":
        return None
    return _numbers_fast(_strict_fast_value(na), _strict_fast_value(nb))


def _strict_parse(s: str):
    mv = _math_verify()
    latex = "$" + s.replace("$", "") + "$"
    return mv["parse"](latex, extraction_config=[mv["latex"]()], fallback_mode="no_fallback")


def _first_expr(parsed):
    from sympy import Basic

    return next((x for x in parsed if isinstance(x, Basic)), None)


def _equation_equiv(na: str, nb: str) -> bool:
    """Two equations state the same relation: lhs - rhs of one is a nonzero constant times that of the other
    (``2x+4y-3=0`` is ``y=-\\frac12x+\\frac34``; the sides may be swapped or rearranged)."""
    from sympy import simplify

    sides = []
    for s in (na, nb):
        lhs, rhs = _top_level_split(s, "=")
        lhs, rhs = (_first_expr(_cached("strict", x.strip(), _strict_parse)) for x in (lhs, rhs))
        if lhs is None or rhs is None:
            return False
        sides.append(lhs - rhs)
    da, db = sides
    if huge_evaluation(da) or huge_evaluation(db):
        return False
    if simplify(da - db) == 0:
        return True
    if db == 0:
        return False
    ratio = simplify(da / db)
    return not ratio.free_symbols and ratio.is_zero is False and ratio.is_finite is True


def _mv_equiv(na: str, nb: str) -> bool:
    """math-verify, one direction, never matching an equation with a non-equation (its one-sided comparison
    would accept one side of ``a^2+b=0``)."""
    mv = _math_verify()
    from math_verify.grader import is_equation

    pa, pb = _cached("strict", na, _strict_parse), _cached("strict", nb, _strict_parse)
    if not pa or not pb:
        return False
    ea, eb = _first_expr(pa), _first_expr(pb)
    if ea is not None and eb is not None and _relation(ea, is_equation) != _relation(eb, is_equation):
        return False
    return bool(mv["verify"](pa, pb))


def _relation(expr, is_equation) -> bool:
    """An equation that is not a value: ``x \\in [2,5)`` (parsed as x = [2,5)) and ``x = 3`` are their value."""
    from sympy import Symbol

    if not is_equation(expr):
        return False
    try:
        return not (isinstance(expr.lhs, Symbol) and not expr.rhs.free_symbols)
    except AttributeError:  # a chain of equations
        return True


def _strict_entry_slow(x: str, y: str) -> bool:
    return _strict_math_direction(x, y) or _strict_math_direction(y, x)


def _strict_math_direction(a: str, b: str) -> bool:
    """One direction of strict math equivalence (the slow path; includes the text comparison)."""
    verdict, na, nb, shape = _strict_prelude(a, b)
    if verdict is not None:
        return verdict
    try:
        if shape == "matrix":
            return bool(_matrix_equiv(na, nb, _strict_entry_slow))
        if shape == "eq":
            return _equation_equiv(na, nb)
        return _mv_equiv(na, nb)
    except Exception:
        return False
