"""BoardgameQA / StrategyQA answers: true / false / uncertain, by substring (``evolm``) or whole word (``strict``)."""

from __future__ import annotations

import re
from typing import Optional

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


_LABELS = "|".join(sorted(_NLI_WORD_CLASS))
# a negation that bears on a label: "not true", "isn't correct", "not really true", "never a correct" -- a "not" in a
# reason that follows ("false (it would not fit)") negates no label
_NEGATED_LABEL = re.compile(rf"(?:\b(?:not|never)\b|n't\b|n’t\b)(?:\s+[a-z]+)?\s+(?:{_LABELS})\b")


def _nli_label_strict(answer: str) -> Optional[str]:
    """Whole-word matching: exactly one class among the answer's words, else no answer; a negated label ("not
    true", "isn't correct", at most one word between) is no answer rather than the label it negates."""
    low = answer.lower()
    if _NEGATED_LABEL.search(low):
        return None
    labels = {_NLI_WORD_CLASS[w] for w in _WORD_RE.findall(low) if w in _NLI_WORD_CLASS}
    return labels.pop() if len(labels) == 1 else None


def nli_label(answer: Optional[str], mode: str = "evolm") -> Optional[str]:
    """"true" / "false" / "uncertain" / None for an answer string."""
    if not isinstance(answer, str) or not answer:
        return None
    return _nli_label_evolm(answer) if mode == "evolm" else _nli_label_strict(answer)
