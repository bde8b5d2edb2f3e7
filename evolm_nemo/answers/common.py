"""What every part of the answer checker shares: the scoring modes, the suite and mode checks, the per-direction
timeout and the check counters. The suites themselves are in :mod:`evolm_nemo.tasks`."""

from __future__ import annotations

from evolm_nemo.tasks import SUITE_KIND, SUITES

MODES = ("evolm", "strict")
TIMEOUT_S = 4.0  # per direction, as the reference's @timeout(timeout_seconds=4)
_STATS = {"fast": 0, "slow": 0, "cached": 0, "huge": 0, "over_budget": 0}  # math checks so far, see stats()


def _check_suite(suite: str) -> str:
    kind = SUITE_KIND.get(suite)
    if kind is None:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    return kind


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; expected one of {', '.join(MODES)}")
