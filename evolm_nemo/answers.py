"""Answer extraction and equivalence for the six downstream suites, shared by evaluation, SFT filtering and the PPO
reward.

Two modes:

* ``evolm`` (default) reproduces, verdict for verdict, the evaluator of EvoLM's released cot-eval-harness
  (``Evaluator.py`` driven by ``evaluate_responses.py``) with math-verify 0.3.3, quirks included, so that our numbers
  are comparable with the paper's. Math suites compare the bare strings with ``verify(parse(a), parse(b))`` OR-ed over
  both orders; CRUXEval strips single quotes and compares ``ast.literal_eval`` values; BoardgameQA / StrategyQA map an
  answer to true / false / uncertain by substring words.
* ``strict`` is the scorer a careful user wants. It fixes the reference's quirks: answers are normalised (``\\$``,
  ``\\text{}``, ``\\dfrac``, ``\\frac65``, units, thousands separators) and parsed as one delimited LaTeX expression, so
  ``6\\sqrt{8}`` no longer matches ``6\\sqrt{7}`` and tuples, intervals and ``\\sqrt{..}`` work; text answers compare as
  normalised text; CRUXEval compares Python literals without stripping quotes and keeps ``True`` apart from ``1``; the
  true/false/uncertain words are matched as whole words, so "Not sure" and "None" are no answer.

Speed and safety. Every check is bounded: anything that needs sympy runs in a helper process (one per concurrent
caller, started on first use, parse results memoised there) under a per-direction alarm (``TIMEOUT_S``, 4 s as in
the reference) and a wall-clock backstop after which the helper is killed and replaced (code stuck in C, e.g. a huge
integer power, cannot be interrupted by a signal); a timeout counts as "not equivalent". So the functions here never
hang, work from any thread (no signals in the caller) and never crash on odd model output.
Common cases (plain numbers, thousands commas, ``$``, ``\\%``, units, ``a/b`` and ``\\frac{a}{b}`` with integers, and
strings math-verify cannot parse at all) are decided in pure Python by a fast path that only answers where it
provably agrees with the sympy path of the same mode (tests/evaluation check this differentially); everything else
goes to the sympy path. Results are cached per (mode, pair).

Extraction is the reference's in ``evolm`` mode (the last ``\\boxed{}``, else everything after the last "answer is");
``strict`` mode takes the same box, but cuts an "answer is" answer at the end of its clause (see
:func:`strict_cut`), so "The answer is 56, as we know." is 56.

Bounded work per row. Two more bounds keep a whole row (16 completions: up to 16 gold checks plus 120 pairwise
Maj@16 checks) within seconds: towers of powers and huge numbers are recognised on the parsed expression before
sympy evaluates them (:func:`huge_evaluation`, past ``HUGE_DIGITS`` digits: the evaluation counts as timed out,
which is what the reference evaluator's own timeout does to it, so ``evolm`` verdicts are unchanged), and
:class:`time_budget` shares one wall-clock budget among the slow checks of a row (evaluation/score.py: 10 s per
row); checks the budget leaves unfinished count as "not equivalent" and are reported.

Public API (kept stable): :func:`extract_answer`, :func:`gold_answer`, :func:`is_equiv`, :func:`judge`,
:func:`fast_verdict`, :func:`stats`, :func:`time_budget`, ``SUITES``, ``MODES``, ``SUITE_KIND``. This module lives outside
``evolm_nemo.evaluation`` because training (SFT filtering, the PPO reward) uses it as well.
"""

from __future__ import annotations

import ast
import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Optional

SUITES = ("gsm8k_platinum", "math", "cruxeval", "boardgameqa", "tabmwp", "strategyqa")
MODES = ("evolm", "strict")
# how a suite compares answers: math-verify (math), Python literals (crux), true/false/uncertain (nli)
SUITE_KIND = {
    "gsm8k_platinum": "math",
    "math": "math",
    "tabmwp": "math",
    "cruxeval": "crux",
    "boardgameqa": "nli",
    "strategyqa": "nli",
}
TIMEOUT_S = 4.0  # per direction, as the reference's @timeout(timeout_seconds=4)


def _check_suite(suite: str) -> str:
    kind = SUITE_KIND.get(suite)
    if kind is None:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    return kind


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {', '.join(MODES)}")


# ------------------------------------------------------------------------------------------------------------------
# Extraction: the last \boxed{...}; otherwise what follows the last "answer is" (in strict mode cut at its clause's
# end).
# ------------------------------------------------------------------------------------------------------------------

_BRACE_RE = re.compile(r"[{}]")


def last_boxed(text: str) -> Optional[str]:
    """The last ``\\boxed...{...}`` span (or, with no ``\\boxed`` at all, the last ``\\fbox``), reference semantics.

    The span runs from the command to the first ``}`` at which the running brace depth (counted from the command,
    ``{`` +1, ``}`` -1) returns to exactly zero; without such a brace there is no box.
    """
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for m in _BRACE_RE.finditer(text, start):
        if m.group() == "{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return text[start : m.end()]
    return None


def unbox(box: Optional[str]) -> str:
    """Content of a ``\\boxed{..}`` / ``\\boxed ..`` span; "" for anything else (``\\fbox`` included)."""
    if box is None:
        return ""
    if "\\boxed " in box:
        return box[len("\\boxed ") :] if box.startswith("\\boxed ") else ""
    if box.startswith("\\boxed{") and box.endswith("}"):
        return box[len("\\boxed{") : -1]
    return ""


def _after_answer_is(text: str) -> Optional[str]:
    if "answer is" not in text:
        return None
    answer = text.rsplit("answer is", 1)[1].strip()
    if ":" in answer:
        answer = answer.rsplit(":", 1)[1].strip()
    return answer


# Words that start a clause after ", " / "; " (conjunctions, relative and personal pronouns, determiners,
# prepositions, sentence adverbs). Other words after a comma ("red, blue", "Alice, Bob") are part of the answer.
_CLAUSE_WORDS = frozenset(
    """
    and or but nor so yet as because since which who whom whose where when whereas while though although if unless
    until that than then thus hence therefore meaning making giving given based according assuming considering
    rounded rounding not also just exactly approximately roughly about respectively
    i we you he she it they this these those there here its our my your their his her the a an each all both
    for from in on at by with without to of per after before under over like including excluding
    """.split()
)
# these end a clause only before a word: ", and 5" / ", or \\frac{1}{2}" continue a list, "x, a" may be a variable
_NEEDS_WORD = frozenset(("and", "or", "a", "i"))
_CLAUSE_SEP = re.compile(r"[,;]\s+(?P<word>[A-Za-z]+)(?![A-Za-z])\s*(?P<next>.?)", re.ASCII | re.DOTALL)
_SENTENCE_SEP = re.compile(r"\.\s+[A-Za-z]", re.ASCII)
_WORD_BEFORE = re.compile(r"(?P<dot>\.?)(?P<word>[A-Za-z]+)$", re.ASCII)
_TITLES = frozenset(("mr", "mrs", "ms", "dr", "st", "prof", "vs"))
_OPEN, _CLOSE = "([{", ")]}"


def _dot_kind(s: str, i: int) -> str:
    """What the '.' at s[i] is: "abbrev" (ends "A.M." / "D.C.": the dot belongs to the answer), "title" ("Mr.": no
    sentence ends here) or "stop"."""
    m = _WORD_BEFORE.search(s, max(0, i - 32), i)
    if m is None:
        return "stop"
    if len(m.group("word")) == 1 and m.group("dot"):
        return "abbrev"
    if m.group("word").lower() in _TITLES:
        return "title"
    return "stop"


def strict_cut(answer: str) -> str:
    """Strict mode's end of an "answer is" answer: the text before the first clause boundary outside brackets,
    braces, parentheses and quoted strings, with a final sentence period dropped. A boundary is ", " or "; " followed
    by a clause word (``_CLAUSE_WORDS``: "as", "which", "so", "we", ...; "and", "or", "a", "i" only when a word
    follows), or a sentence end ". " followed by a letter (after "A.M." the cut keeps the period; "Mr. " is no end).
    So "1,200", "(2, 3)", "[6, 1]", "2, 3", "\\frac{1}{2}, \\frac{3}{4}" and "red, blue" stay whole, "56, as we know."
    is "56", "56 dollars." is "56 dollars" (units are left to :func:`strict_normalize`) and "8 A.M." keeps its
    period."""
    cut = answer[: _clause_end(answer)].rstrip()
    if cut.endswith(".") and not cut.endswith("..") and _dot_kind(cut, len(cut) - 1) == "stop":
        cut = cut[:-1].rstrip()
    return cut


def _clause_end(answer: str) -> int:
    """Index of the first clause boundary of `answer` (len(answer) if none). A quote opens a string only after a
    non-alphanumeric character ("Mike's" has none) and when the same quote character occurs later."""
    last = {q: answer.rfind(q) for q in "'\""}
    depth = 0
    quote = None
    i = 0
    while i < len(answer):
        ch = answer[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == answer[quote]:
                quote = None
        elif ch in "'\"" and i < last[ch] and (i == 0 or not answer[i - 1].isalnum()):
            quote = i
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)
        elif depth == 0 and ch in ",;":
            m = _CLAUSE_SEP.match(answer, i)
            word = m.group("word").lower() if m else ""
            if word in _CLAUSE_WORDS and (word not in _NEEDS_WORD or m.group("next").isalpha()):
                return i
        elif depth == 0 and ch == "." and _SENTENCE_SEP.match(answer, i):
            kind = _dot_kind(answer, i)
            if kind != "title":
                return i + 1 if kind == "abbrev" else i
        i += 1
    return len(answer)


def extract_answer(text: str, mode: str = "evolm") -> Optional[str]:
    """The model's final answer: the last ``\\boxed{}`` (an empty box or ``\\fbox`` gives none), else everything after
    the last "answer is" (cut after its last ':'; in ``strict`` mode also at the end of its clause, see
    :func:`strict_cut`); None when there is neither or it is empty. ``evolm`` mode is the reference's extraction.
    Never raises on any `text` (an unknown `mode` is a ValueError)."""
    _check_mode(mode)
    if not isinstance(text, str):
        return None
    if "\\boxed" not in text and "answer is" not in text:
        return None
    boxed = unbox(last_boxed(text))
    if boxed:
        return boxed
    answer = _after_answer_is(text)
    if answer and mode == "strict":
        answer = strict_cut(answer)
    return answer or None


# ------------------------------------------------------------------------------------------------------------------
# Gold answers
# ------------------------------------------------------------------------------------------------------------------


def gold_answer(suite: str, row: dict) -> str:
    """The gold answer of a cooked row ``{id, problem, gt_solution, gt_answer}``: ``gt_answer`` when not null, else
    from ``gt_solution`` (GSM8K: after the last ``#### ``; MATH: the last ``\\boxed{}``; BoardgameQA / StrategyQA:
    its true/false/uncertain label; others: the solution itself). "" when there is none (never equivalent)."""
    kind = _check_suite(suite)
    answer = row.get("gt_answer")
    if answer is not None:
        return answer if isinstance(answer, str) else str(answer)
    solution = row.get("gt_solution")
    if solution is None:
        return ""
    if isinstance(solution, (int, float)) and not isinstance(solution, bool):
        return str(solution)
    if not isinstance(solution, str):
        return ""
    if suite == "gsm8k_platinum":
        return solution.rsplit("#### ", 1)[-1].strip()
    if suite == "math":
        return unbox(last_boxed(solution))
    if kind == "nli":
        return _nli_label_evolm(solution) or ""
    return solution


# ------------------------------------------------------------------------------------------------------------------
# BoardgameQA / StrategyQA: true / false / uncertain
# ------------------------------------------------------------------------------------------------------------------

_NLI_WORDS = {
    "true": ("yes", "true", "correct"),
    "false": ("no", "false", "incorrect"),
    "uncertain": ("unknown", "unanswerable", "uncertain"),
}
_NLI_WORD_CLASS = {w: label for label, words in _NLI_WORDS.items() for w in words}
_WORD_RE = re.compile(r"[a-z]+")


def _nli_label_evolm(answer: str) -> Optional[str]:
    """Reference mapping: substring tests on the lower-cased answer; words of two classes give no answer. So "Not
    sure" and "None" are false (they contain "no"), "incorrect" and "unknown" are no answer."""
    a = answer.lower().strip()
    hits = [label for label, words in _NLI_WORDS.items() if any(w in a for w in words)]
    return hits[0] if len(hits) == 1 else None


def _nli_label_strict(answer: str) -> Optional[str]:
    """Whole-word matching: exactly one class among the answer's words, else no answer."""
    labels = {_NLI_WORD_CLASS[w] for w in _WORD_RE.findall(answer.lower()) if w in _NLI_WORD_CLASS}
    return labels.pop() if len(labels) == 1 else None


def nli_label(answer: Optional[str], mode: str = "evolm") -> Optional[str]:
    """"true" / "false" / "uncertain" / None for an answer string."""
    if not isinstance(answer, str) or not answer:
        return None
    return _nli_label_evolm(answer) if mode == "evolm" else _nli_label_strict(answer)


# ------------------------------------------------------------------------------------------------------------------
# CRUXEval: Python literals
# ------------------------------------------------------------------------------------------------------------------


def _unwrap_text(s: str) -> str:
    s = s.strip()
    if s.startswith("\\text{") and s.endswith("}"):
        return s[len("\\text{") : -1]
    return s


def _literal_or_str(s: str):
    try:
        return ast.literal_eval(s)
    except BaseException:  # SyntaxError, ValueError, MemoryError, RecursionError, ... (the reference: bare except)
        return s


def _crux_equiv_evolm(a: str, b: str) -> bool:
    def norm(x: str) -> str:
        x = _unwrap_text(x)
        if x.startswith("'") and x.endswith("'"):
            x = x[1:-1]
        return x

    try:
        return bool(_literal_or_str(norm(a)) == _literal_or_str(norm(b)))
    except BaseException:
        return False


def _same_value(x, y, depth: int = 0) -> bool:
    """Equality of Python literal values that keeps bool apart from int (``True`` is not ``1``) and str apart from
    everything else; containers compare element-wise with the same rule."""
    if depth > 100:
        return False
    if isinstance(x, bool) or isinstance(y, bool):
        return type(x) is type(y) and x == y
    if isinstance(x, (int, float, complex)) and isinstance(y, (int, float, complex)):
        return x == y
    if type(x) is not type(y):
        return False
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same_value(u, v, depth + 1) for u, v in zip(x, y))
    if isinstance(x, dict):
        if len(x) != len(y) or set(x) != set(y):
            return False
        return all(_same_value(x[k], y[k], depth + 1) for k in x)
    return x == y


def _crux_value_strict(s: str):
    s = _unwrap_text(s)
    for candidate in (s, s[:-1].rstrip() if s.endswith(".") else None):
        if candidate:
            try:
                return ast.literal_eval(candidate)
            except BaseException:
                pass
    return s  # an unquoted string answer stands for itself


def _crux_equiv_strict(a: str, b: str) -> bool:
    try:
        return _same_value(_crux_value_strict(a), _crux_value_strict(b))
    except BaseException:
        return False


# ------------------------------------------------------------------------------------------------------------------
# Math suites, evolm mode. Slow path: math-verify exactly as the reference calls it. Fast path: a small grammar of
# strings whose math-verify parse is known exactly (a number, or nothing at all).
# ------------------------------------------------------------------------------------------------------------------

# Value kinds of the fast grammar: ("int" | "frac" | "dec", Fraction, digits) ; _NOPARSE: math-verify extracts nothing.
_NOPARSE = "noparse"

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


def _evolm_math_fast(a: str, b: str) -> Optional[bool]:
    return _numbers_fast(_evolm_fast_value(a), _evolm_fast_value(b))


_MV = None


def _math_verify():
    """math_verify's parse / verify and config classes, imported on first use (sympy is slow to import)."""
    global _MV
    if _MV is None:
        import logging
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
        _guard_huge_evaluation()
        _MV = {"parse": parse, "verify": verify, "latex": LatexExtractionConfig, "expr": ExprExtractionConfig}
    return _MV


# ------------------------------------------------------------------------------------------------------------------
# Towers of powers and huge numbers. math-verify evaluates exact numbers with sympy's doit() / simplify() / solve():
# ``9^{9^{9}}`` is an integer of 3.7e8 digits whose computation runs for minutes in C (no signal interrupts it). A
# cheap walk over the parsed expression estimates how many digits such an evaluation would produce; past
# HUGE_DIGITS the evaluation is cut off where math-verify would start it, with math-verify's own TimeoutException,
# i.e. exactly what the reference evaluator's timeout does to that comparison (its other comparisons, such as the
# string comparison, still run). HUGE_DIGITS is far beyond what finishes inside TIMEOUT_S (on the 2-core CPU box
# computing a power of 1e7 digits takes 6.9 s, 3e7 digits about 35 s), so no verdict that the reference evaluator
# finishes changes.
# ------------------------------------------------------------------------------------------------------------------

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


_PARSE_CACHE: Optional[dict] = None  # enabled in the helper process: parse results by (mode, string)
_DEADLINE: Optional[float] = None  # time.monotonic() at which the running bounded check's alarm fires
_PARSE_CACHE_MAX = 20_000


def _cached(mode: str, s: str, parse: Callable[[str], list]) -> list:
    """parse(s), memoised in the helper (parsing is deterministic; a parse cut by a timeout raises, so is not kept)."""
    if _PARSE_CACHE is None:
        return parse(s)
    key = (mode, s)
    hit = _PARSE_CACHE.get(key)
    if hit is None:
        hit = parse(s)
        if _DEADLINE is not None and time.monotonic() >= _DEADLINE:
            return hit  # the alarm may have cut this parse short (math-verify swallows its TimeoutError): not kept
        if len(_PARSE_CACHE) >= _PARSE_CACHE_MAX:
            _PARSE_CACHE.clear()
        _PARSE_CACHE[key] = hit
    return hit


def _evolm_math_direction(a: str, b: str) -> bool:
    """One direction of the reference's ``latex_equiv``: ``verify(parse(a), parse(b))``, any exception -> False."""
    mv = _math_verify()
    try:
        return bool(mv["verify"](_cached("evolm", a, mv["parse"]), _cached("evolm", b, mv["parse"])))
    except Exception:
        return False


# ------------------------------------------------------------------------------------------------------------------
# Math suites, strict mode: normalise, compare as text, then as one delimited LaTeX expression.
# ------------------------------------------------------------------------------------------------------------------

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


# ------------------------------------------------------------------------------------------------------------------
# Bounded slow checks: a helper process per concurrent caller.
# ------------------------------------------------------------------------------------------------------------------

_SLOW_DIRECTIONS: dict[str, Callable[[str, str], bool]] = {
    "evolm": _evolm_math_direction,
    "strict": _strict_math_direction,
}


class _CheckTimeout(BaseException):
    """Raised by our alarm inside a bounded check; a BaseException so that `except Exception` does not eat it."""


def _bounded(fn: Callable[[], bool], seconds: float, wall_clock: bool = False) -> Optional[bool]:
    """Run fn (main thread only) under a time limit; None on timeout. The alarm re-fires every 50 ms after the
    limit in case library code swallows the exception. `wall_clock` uses ITIMER_REAL (only in the helper process,
    where math-verify's own signal.alarm calls are neutralised); otherwise ITIMER_PROF (CPU time), which
    math-verify's alarm(0) calls cannot cancel."""
    import signal

    which, signum = (signal.ITIMER_REAL, signal.SIGALRM) if wall_clock else (signal.ITIMER_PROF, signal.SIGPROF)
    state = {"armed": True}

    def on_alarm(sig, frame):
        if state["armed"]:
            raise _CheckTimeout()

    global _DEADLINE
    previous = signal.signal(signum, on_alarm)
    _DEADLINE = time.monotonic() + seconds if wall_clock else None
    signal.setitimer(which, seconds, 0.05)
    try:
        return fn()
    except _CheckTimeout:
        return None
    finally:
        while True:  # disarm; an alarm landing right here must not escape
            try:
                state["armed"] = False
                break
            except _CheckTimeout:
                continue
        signal.setitimer(which, 0, 0)
        signal.signal(signum, previous)
        _DEADLINE = None


def slow_direction_inprocess(mode: str, a: str, b: str, timeout: Optional[float] = TIMEOUT_S) -> bool:
    """One direction of the sympy path in the calling process, bounded by `timeout` seconds of CPU time when called
    from the main thread (unbounded elsewhere or with timeout=None). A timeout is False."""
    direction = _SLOW_DIRECTIONS[mode]
    if timeout is None or threading.current_thread() is not threading.main_thread():
        return direction(a, b)
    return bool(_bounded(lambda: direction(a, b), timeout))


def slow_equiv_inprocess(mode: str, a: str, b: str, timeout: Optional[float] = TIMEOUT_S) -> bool:
    """The sympy path of math equivalence in the calling process: both directions OR-ed, each bounded as in
    :func:`slow_direction_inprocess`. Used by the benchmark's naive scorer and the differential tests; normal calls
    go through :func:`is_equiv`, which runs this in a helper process."""
    return slow_direction_inprocess(mode, a, b, timeout) or slow_direction_inprocess(mode, b, a, timeout)


def _worker_main() -> None:
    """Helper process: read JSON requests [id, mode, a, b, timeout] on stdin, answer [id, verdict] on stdout: the
    two directions OR-ed, each bounded by a wall-clock alarm of `timeout` seconds."""
    import signal

    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # stray prints from libraries must not corrupt the protocol
    sys.stdout = open(os.devnull, "w")
    # math-verify arms its own SIGALRM timers (5 s / 10 s, longer than ours) and cancels them with alarm(0), which
    # would also cancel ours; in this process only, its alarm calls do nothing and our wall-clock alarm bounds each
    # direction (math-verify's SIGALRM handler still turns our alarm into its TimeoutError inside its wrappers).
    signal.alarm = lambda seconds: 0
    global _PARSE_CACHE
    _PARSE_CACHE = {}
    _math_verify()
    for mode in MODES:  # warm up (antlr, sympy caches) before announcing readiness
        _SLOW_DIRECTIONS[mode]("\\frac{1}{2}", "0.5")
    out.write('"ready"\n')
    for line in sys.stdin:
        try:
            rid, mode, a, b, timeout = json.loads(line)
        except ValueError:
            continue
        timed_out = False
        try:
            direction = _SLOW_DIRECTIONS[mode]
            verdict = _bounded(lambda: direction(a, b), float(timeout), wall_clock=True)
            if not verdict:
                timed_out = verdict is None
                verdict = _bounded(lambda: direction(b, a), float(timeout), wall_clock=True)
                timed_out = timed_out or verdict is None
            verdict = bool(verdict)
        except BaseException:  # noqa: BLE001 - any failure of a check is "not equivalent"
            verdict = False
        out.write(json.dumps([rid, verdict, timed_out]) + "\n")


class _Helper:
    """One helper process and its pipes; used by one thread at a time."""

    START_TIMEOUT_S = 180.0
    GRACE_S = 1.5  # past the helper's own alarm, code stuck in C (huge integer powers) gets the helper killed

    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, above evolm_nemo/
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from evolm_nemo.answers import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self._next_id = 0
        if self._readline(self.START_TIMEOUT_S) is None:
            self.close()
            raise RuntimeError("the math-verify helper process did not start (is math-verify installed?)")

    def _readline(self, timeout: float) -> Optional[bytes]:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None  # the helper died
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def check(self, mode: str, a: str, b: str, timeout: float) -> Optional[tuple[bool, bool]]:
        """(verdict, timed out): both directions OR-ed, each under the helper's alarm; None if the helper died or ran
        past the backstop (then it must be dropped)."""
        self._next_id += 1
        rid = self._next_id
        try:
            self.proc.stdin.write((json.dumps([rid, mode, a, b, timeout]) + "\n").encode("utf-8"))
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            return None
        backstop = 2 * timeout + self.GRACE_S
        while True:
            line = self._readline(backstop)
            if line is None:
                return None
            try:
                got_id, verdict, timed_out = json.loads(line)
            except (ValueError, TypeError):
                continue
            if got_id == rid:
                return bool(verdict), bool(timed_out)

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.close()
                except OSError:
                    pass
                try:
                    self.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        except Exception:
            pass
        for stream in (self.proc.stdout, self.proc.stdin):
            try:
                stream.close()
            except Exception:
                pass


class _HelperPool:
    def __init__(self):
        self._idle: list[_Helper] = []
        self._all: list[_Helper] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def check(self, mode: str, a: str, b: str, timeout: float) -> tuple[bool, bool]:
        """(verdict, timed out) of one pair in a helper process; a helper that dies or overruns is killed and the pair
        is (False, True)."""
        with self._lock:
            if self._pid != os.getpid():  # forked: the helpers belong to the parent process
                self._idle, self._all, self._pid = [], [], os.getpid()
            helper = self._idle.pop() if self._idle else None
        if helper is None:
            helper = _Helper()
            with self._lock:
                self._all.append(helper)
        verdict = helper.check(mode, a, b, timeout)
        if verdict is None:  # timed out past the backstop or died: kill it, the pair counts as not equivalent
            helper.proc.kill()
            helper.close()
            with self._lock:
                self._all.remove(helper)
            return False, True
        with self._lock:
            self._idle.append(helper)
        return verdict

    def close(self) -> None:
        with self._lock:
            helpers, self._all, self._idle = self._all, [], []
        for helper in helpers:
            helper.close()


_POOL = _HelperPool()
atexit.register(_POOL.close)


def shutdown_helpers() -> None:
    """Stop the helper processes (they are restarted on demand)."""
    _POOL.close()


# ------------------------------------------------------------------------------------------------------------------
# Equivalence
# ------------------------------------------------------------------------------------------------------------------

_CACHE: dict = {}
_CACHE_MAX = 200_000
_STATS = {"fast": 0, "slow": 0, "cached": 0, "huge": 0, "over_budget": 0}


_BUDGET = threading.local()
MIN_CHECK_S = 0.05  # a slow check is not started with less budget left than this


class TimeBudget:
    """The time budget shared by the slow checks made inside ``with time_budget(seconds)`` in one thread.

    ``skipped``: slow checks not started because the budget was spent; ``cut``: checks that ran with less than the
    full TIMEOUT_S (what was left) and timed out. Both count as "not equivalent" and are not cached."""

    def __init__(self, seconds: Optional[float]):
        self.seconds = seconds
        self.deadline = None if seconds is None else time.monotonic() + seconds
        self.skipped = 0
        self.cut = 0

    @property
    def unfinished(self) -> int:
        return self.skipped + self.cut


class time_budget:  # noqa: N801 - used as a context manager, like open()
    """``with time_budget(8.0) as budget: ...``: every slow (sympy) check of :func:`is_equiv` made inside, in this
    thread, shares `seconds` of wall-clock time. A check runs under min(TIMEOUT_S, half the budget left) per
    direction; once the budget is spent, further slow checks are not run and count as "not equivalent". Fast-path
    and cached verdicts cost nothing and are unaffected. Nested budgets: the inner one also respects the outer's end.
    ``None`` means no budget."""

    def __init__(self, seconds: Optional[float]):
        self.budget = TimeBudget(seconds)

    def __enter__(self) -> TimeBudget:
        self.previous = getattr(_BUDGET, "current", None)
        if self.previous is not None and self.previous.deadline is not None and (
                self.budget.deadline is None or self.previous.deadline < self.budget.deadline):
            self.budget.deadline = self.previous.deadline
        _BUDGET.current = self.budget
        return self.budget

    def __exit__(self, *exc) -> None:
        _BUDGET.current = self.previous
        if self.previous is not None:
            self.previous.skipped += self.budget.skipped
            self.previous.cut += self.budget.cut


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


if __name__ == "__main__":  # pragma: no cover - the helper is started with -c, this is for manual debugging
    _worker_main()
