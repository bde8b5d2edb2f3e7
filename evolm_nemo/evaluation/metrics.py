"""Downstream metrics as EvoLM's code computes them: Pass@1, Maj@16, RM@16, Pass@16, correct ratio, per suite and
averaged over the in-domain (ID) and out-of-domain (OOD) groups.

* Pass@1: the greedy completion judged.
* Maj@16: the answer of each completion is extracted from its last 128 characters only; completions are clustered
  first-fit, each against the first member of every existing cluster, by the suite's equivalence; a completion
  without an answer (or whose answer matches no cluster) starts its own cluster. The largest cluster wins, ties to
  the earliest; the verdict is its first completion judged on its full text.
* RM@16: the completion with the highest reward-model score (ties to the first index; numpy.argmax semantics, so a
  NaN score wins) judged.
* Pass@16: any completion correct.
* Correct ratio: mean of (#correct / #completions) over the problems with at least one correct completion (the
  paper's definition; the released code never aggregates it). Undefined (null, shown as "-") when no problem has
  a correct completion.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

from evolm_nemo.answers import extract_answer
from evolm_nemo.tasks import ID_SUITES, OOD_SUITES
MAJ_LAST_CHARS = 128
METRICS = ("pass1", "maj16", "rm16", "pass16", "correct_ratio")


def majority_answers(
    completions: Sequence[str], last_chars: int = MAJ_LAST_CHARS, mode: str = "evolm"
) -> list[Optional[str]]:
    """The answers Maj@16 votes with: each extracted (with `mode`'s extraction) from the completion's last
    `last_chars` characters."""
    return [extract_answer(c[-last_chars:], mode) if isinstance(c, str) else None for c in completions]


def majority_index(
    completions: Sequence[str],
    answers: Sequence[Optional[str]],
    same: Callable[[str, str], bool],
) -> int:
    """Index of the completion whose verdict is Maj@16's (the reference's first-fit clustering).

    `answers[i]` is completion i's vote (see :func:`majority_answers`); `same(candidate, representative)` is the
    suite's equivalence. None answers never join a cluster. Returns the first index whose text equals the winning
    cluster's first completion (the reference looks it up with ``list.index``).
    """
    if not completions:
        raise ValueError("majority_index needs at least one completion")
    clusters: list[list[int]] = []
    for i, answer in enumerate(answers):
        for cluster in clusters:
            representative = answers[cluster[0]]
            if answer is not None and representative is not None and same(answer, representative):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    best = max(clusters, key=len)  # max() keeps the first of equal sizes
    return list(completions).index(completions[best[0]])


def rm_index(scores: Optional[Sequence[float]]) -> Optional[int]:
    """numpy.argmax over reward-model scores: the first maximum, or the first NaN if any; None without scores."""
    if scores is None or len(scores) == 0:
        return None
    best = 0
    for i, s in enumerate(scores):
        s = float(s)
        if math.isnan(s):
            return i
        if s > float(scores[best]):
            best = i
    return best


def correct_ratio(corrects: Iterable[Sequence[bool]]) -> Optional[float]:
    """Mean of #correct / #completions over problems with at least one correct completion; None (undefined, shown
    as "-" and left out of group averages) when no problem has one."""
    ratios = [sum(map(bool, c)) / len(c) for c in corrects if c and any(c)]
    return sum(ratios) / len(ratios) if ratios else None


def _mean(values: Sequence) -> Optional[float]:
    values = [float(v) for v in values if v is not None]
    return sum(values) / len(values) if values else None


def suite_summary(rows: Sequence[dict]) -> dict:
    """{"n", "pass1", "maj16", "rm16", "pass16", "correct_ratio", "rm_score_mean"} over scored rows of one suite. rm16
    and rm_score_mean cover the rows that have reward-model scores (null when none has)."""
    return {
        "n": len(rows),
        "pass1": _mean([bool(r["pass1"]) for r in rows]) or 0.0,
        "maj16": _mean([bool(r["maj16"]) for r in rows]) or 0.0,
        "rm16": _mean([r["rm16"] for r in rows if r.get("rm16") is not None]),
        "pass16": _mean([bool(r["pass16"]) for r in rows]) or 0.0,
        "correct_ratio": correct_ratio(r["correct"] for r in rows),
        # the mean ORM score of every completion (rows with rm_scores): EvoLM's Takeaway 12 relates it to accuracy
        "rm_score_mean": _mean([s for r in rows for s in (r.get("rm_scores") or [])]),
    }


def group_average(per_suite: dict, suites: Sequence[str]) -> dict:
    """Unweighted mean of each metric over the suites present (null where no suite has a value); n is the total."""
    present = [per_suite[s] for s in suites if s in per_suite]
    out = {"n": sum(p["n"] for p in present)}
    for metric in METRICS:
        out[metric] = _mean([p[metric] for p in present])
    return out


def summarize(scored_rows: Sequence[dict]) -> dict:
    """The summary printed by `evolm score`: {suite: {...}, ..., "id_avg": {...}, "ood_avg": {...}}, suites in the
    canonical order, metrics as fractions in [0, 1]."""
    by_suite: dict[str, list[dict]] = {}
    for row in scored_rows:
        by_suite.setdefault(row["suite"], []).append(row)
    order = list(ID_SUITES) + list(OOD_SUITES)
    summary = {s: suite_summary(by_suite[s]) for s in order if s in by_suite}
    summary["id_avg"] = group_average(summary, ID_SUITES)
    summary["ood_avg"] = group_average(summary, OOD_SUITES)
    return summary
