"""math-verify, imported on first use with the huge-evaluation guards installed, and its parse cache (enabled in the
helper process)."""

from __future__ import annotations

import time
from typing import Callable, Optional

from evolm_nemo.answers.guards import _guard_huge_evaluation

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


def enable_parse_cache() -> None:
    """Memoise parse results in this process (the helper process does)."""
    global _PARSE_CACHE
    _PARSE_CACHE = {}


def set_deadline(deadline: Optional[float]) -> None:
    """When the running bounded check's alarm fires (time.monotonic()); None: no check is running."""
    global _DEADLINE
    _DEADLINE = deadline
