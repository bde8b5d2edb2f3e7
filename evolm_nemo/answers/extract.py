"""Answer extraction: the last ``\\boxed{}``, else everything after the last "answer is" (the reference's extraction
in ``evolm`` mode). ``strict`` mode takes the last stated final answer, a box or a later "answer is", and cuts an
"answer is" answer at the end of its clause, see :func:`strict_cut`, so "The answer is 56, as we know." is 56."""

from __future__ import annotations

import re
from typing import Optional

from evolm_nemo.answers.common import _check_mode

_BRACE_RE = re.compile(r"[{}]")


def last_boxed(text: str) -> Optional[str]:
    """The last ``\\boxed...{...}`` span (or, with no ``\\boxed`` at all, the last ``\\fbox``), reference semantics.

    The span runs from the command to the first ``}`` at which the running brace depth (counted from the command,
    ``{`` +1, ``}`` -1) returns to exactly zero; without such a brace there is no box.
    """
    span = _last_boxed_span(text)
    return None if span is None else text[span[0] : span[1]]


def _last_boxed_span(text: str) -> Optional[tuple[int, int]]:
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
                return start, m.end()
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
# words that open a reason after a space alone ("False because ...", "18 since 2*9 = 18"): the answer ends before them
_REASON_WORDS = frozenset("because since therefore thus hence so which as".split())
_REASON_SEP = re.compile(r"\s+(?P<word>[A-Za-z]+)(?![A-Za-z])", re.ASCII)
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
    follows), a space followed by a word that opens a reason (``_REASON_WORDS``: "False because ..." is "False",
    "18 since 2*9 = 18" is "18"), or a sentence end ". " followed by a letter (after "A.M." the cut keeps the period;
    "Mr. " is no end).
    So "1,200", "(2, 3)", "[6, 1]", "2, 3", "\\frac{1}{2}, \\frac{3}{4}" and "red, blue" stay whole, "56, as we know."
    is "56", "56 dollars." is "56 dollars" (units are left to :func:`strict_normalize`) and "8 A.M." keeps its
    period."""
    cut = answer[: _clause_end(answer)].rstrip()
    if cut.endswith(".") and not cut.endswith("..") and _dot_kind(cut, len(cut) - 1) == "stop":
        cut = cut[:-1].rstrip()
    return cut


def _clause_end(answer: str) -> int:
    """Index of the first clause boundary of `answer` (len(answer) if none), outside brackets and quoted strings
    (:func:`_scan`)."""
    for i, ch, outside in _scan(answer):
        if not outside:
            continue
        if ch in ",;":
            m = _CLAUSE_SEP.match(answer, i)
            word = m.group("word").lower() if m else ""
            if word in _CLAUSE_WORDS and (word not in _NEEDS_WORD or m.group("next").isalpha()):
                return i
        elif ch == "." and _SENTENCE_SEP.match(answer, i):
            kind = _dot_kind(answer, i)
            if kind != "title":
                return i + 1 if kind == "abbrev" else i
        elif ch.isspace() and answer[:i].strip() and not answer[i - 1].isspace():
            m = _REASON_SEP.match(answer, i)
            if m and m.group("word").lower() in _REASON_WORDS:
                return i
    return len(answer)


def _scan(s: str):
    """``(index, char, outside)`` for each character of ``s``: ``outside`` when it lies outside brackets, braces,
    parentheses and quoted strings. A quote opens a string only after a non-alphanumeric character ("Mike's" has
    none) and when the same quote character occurs later; a backslash inside a string escapes the next character."""
    last = {q: s.rfind(q) for q in "'\""}
    depth, quote, escaped = 0, None, False
    for i, ch in enumerate(s):
        yield i, ch, depth == 0 and quote is None
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "'\"" and i < last[ch] and (i == 0 or not s[i - 1].isalnum()):
            quote = ch
        elif ch in _OPEN:
            depth += 1
        elif ch in _CLOSE:
            depth = max(0, depth - 1)


def extract_answer(text: str, mode: str = "evolm") -> Optional[str]:
    """The model's final answer. ``evolm`` mode (the reference's extraction): the last ``\\boxed{}`` (an empty box or
    ``\\fbox`` gives none), else everything after the last "answer is", cut after its last ':'. ``strict`` mode: the
    last stated one, a box or a later "answer is" answer (see :func:`_strict_extract`), the latter cut at the end of
    its clause (:func:`strict_cut`), not at an unrelated colon. None when there is none or it is empty.
    Never raises on any `text` (an unknown `mode` is a ValueError)."""
    _check_mode(mode)
    if not isinstance(text, str):
        return None
    if "\\boxed" not in text and "answer is" not in text:
        return None
    if mode == "strict":
        return _strict_extract(text)
    boxed = unbox(last_boxed(text))
    if boxed:
        return boxed
    return _after_answer_is(text) or None


# a later "answer is" followed by one of these judges the boxed answer, it states none ("the answer is correct")
_JUDGEMENT_WORDS = frozenset(
    """
    correct right wrong incorrect reasonable plausible consistent valid invalid verified confirmed indeed not also
    above below boxed given shown as that this in the same still clear obvious likely probably definitely unique
    """.split()
)
_FIRST_WORD = re.compile(r"[A-Za-z]+", re.ASCII)
_LABEL_COLON = re.compile(r"[A-Za-z]:\s+", re.ASCII)


def _strict_answer_is(text: str, after: int) -> Optional[str]:
    """Strict mode's "answer is" answer from the last "answer is" (at `after`): a leading ':' dropped, cut at the end
    of its clause (:func:`strict_cut`), then after a label's colon inside that clause ("as follows: 12" is 12; "8:30"
    is no label). A colon in a later, unrelated sentence cuts nothing."""
    answer = text[after + len("answer is") :].strip()
    if answer.startswith(":"):
        answer = answer[1:].strip()
    answer = strict_cut(answer)
    top = _top_level(answer)
    labels = [m.end() for m in _LABEL_COLON.finditer(answer) if top[m.start()]]
    return answer[labels[-1] :].strip() if labels else answer


def _top_level(s: str) -> list[bool]:
    """Per index of ``s``: whether it lies outside brackets and quoted strings (:func:`_scan`; a label's colon inside
    ``'key: value'`` is part of the answer)."""
    return [outside for _, _, outside in _scan(s)]


def _strict_extract(text: str) -> Optional[str]:
    """The last stated final answer: a non-empty ``\\boxed{}``, or an "answer is" answer after it (so "\\boxed{255}
    ... The final answer is $10,455$." is $10,455$), unless that one only judges the box ("the answer is correct")."""
    span = _last_boxed_span(text)
    boxed = unbox(None if span is None else text[span[0] : span[1]])
    after = text.rfind("answer is")
    if after < 0 or (boxed and after < span[1]):
        return boxed or None
    answer = _strict_answer_is(text, after)
    if boxed and answer:
        word = _FIRST_WORD.match(answer)
        if word and word.group().lower() in _JUDGEMENT_WORDS:
            return boxed
    return answer or boxed or None
