"""Time budgets: one wall-clock budget shared by the slow checks of a row (evaluation/score.py: 10 s per row)."""

from __future__ import annotations

import threading
import time
from typing import Optional

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
