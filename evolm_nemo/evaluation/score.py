"""`evolm score input=<completions.jsonl> output=<scored.jsonl> scoring=evolm|strict workers=N`.

Input rows (one JSON object per line; unknown extra fields are ignored and kept)::

    {"suite": "gsm8k_platinum" | "math" | "cruxeval" | "boardgameqa" | "tabmwp" | "strategyqa",
     "id", "problem", "gt_solution", "gt_answer", "completions": [16 strings],
     "rm_scores": [16 floats] (optional), "greedy": string (optional; else completions[0] is Pass@1's)}

Each output row adds ``gold_answer``, ``extracted`` (one per completion), ``correct`` (booleans), ``pass1``, ``maj16``,
``rm16`` (null without rm_scores) and ``pass16``, all in the selected scoring mode; a row whose slow (sympy) checks
ran past its time budget (``row_budget_s``, shared by the row's gold and Maj@16 comparisons) also gets
``unfinished_checks`` (how many counted as "not equivalent" unfinished), and the command says so on stderr. The last line printed to stdout is
the summary JSON ``{suite: {"n", "pass1", "maj16", "rm16", "pass16", "correct_ratio"}, ..., "id_avg", "ood_avg"}``.
A malformed row stops the command with one line naming the file, line number and field; no output file is written.

Library use: :func:`score_rows` (what sampling and reports call) and :func:`score_row`.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from evolm_nemo.answers import MODES, extract_answer, gold_answer, is_equiv, judge, time_budget
from evolm_nemo.config.compose import compose
from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation.metrics import majority_answers, majority_index, rm_index, summarize
from evolm_nemo.evaluation.tasks import check_problem, check_unique, is_number, non_finite
from evolm_nemo.fileio import check_dst_file, check_writable, iter_jsonl, jsonl_with, write_jsonl
from evolm_nemo.tasks import SUITES

ADDED_FIELDS = ("gold_answer", "extracted", "correct", "pass1", "maj16", "rm16", "pass16")
ROW_BUDGET_S = 10.0  # default wall-clock budget of one row's slow checks
PROGRESS_MIN_ROWS = 100


@dataclass
class ScoreConfig:
    input: Optional[str] = None  # completions JSONL (the `score` input format)
    output: Optional[str] = None  # scored JSONL (null: <input stem>.scored.jsonl next to the input)
    scoring: str = "evolm"  # evolm: EvoLM's evaluator verdict for verdict | strict: the reference's quirks fixed
    workers: int = 0  # concurrent scorers, each with its own math-verify helper process (0: one per CPU core, max 8)
    progress: bool = True  # progress bar on stderr for inputs of 100 rows or more
    row_budget_s: float = 10.0  # wall-clock seconds shared by one row's slow checks (null: unbounded)
    overwrite: bool = False  # replace an existing output (only a scored JSONL: never another command's file)


# ------------------------------------------------------------------------------------------------------------------
# Input validation
# ------------------------------------------------------------------------------------------------------------------


def validate_row(row, where: str) -> None:
    """Raise a one-line ConfigError naming `where` (e.g. ``file.jsonl:7``) and the field if `row` is malformed."""

    def bad(field: str, message: str):
        raise ConfigError(where, f"field '{field}': {message}")

    if not isinstance(row, dict):
        raise ConfigError(where, f"expected a JSON object, got {type(row).__name__}")
    suite = row.get("suite")
    if suite not in SUITES:
        bad("suite", f"expected one of {', '.join(SUITES)}, got {suite!r}" if "suite" in row else "missing")
    check_problem(row, where, suite)
    completions = row.get("completions")
    if not isinstance(completions, list) or not completions:
        bad("completions", "missing" if "completions" not in row else "expected a non-empty list of strings")
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            bad("completions", f"item {i} is {type(c).__name__}, expected a string")
    scores = row.get("rm_scores")
    if scores is not None:
        if not isinstance(scores, list) or not all(is_number(s) for s in scores):
            bad("rm_scores", "expected a list of numbers (or null)")
        if len(scores) != len(completions):
            bad("rm_scores", f"has {len(scores)} scores for {len(completions)} completions")
    greedy = row.get("greedy")
    if greedy is not None and not isinstance(greedy, str):
        bad("greedy", f"expected a string (or null), got {type(greedy).__name__}")
    for field, value in row.items():  # Python's JSON reads NaN / Infinity; they must not reach the outputs
        if (found := non_finite(value)) is not None:
            bad(field, f"holds {json.dumps(found[1])}, not a finite number (a reward model that diverged?); fix or "
                       "drop the row")


def read_rows(path: str) -> list[dict]:
    """Parse and validate a completions JSONL; blank lines are skipped. Errors are one-line ConfigErrors."""
    rows, seen = [], {}
    for where, row in iter_jsonl(path, key="input"):
        validate_row(row, where)
        check_unique(row, where, seen.setdefault(row["suite"], {}))  # e.g. two files concatenated
        rows.append(row)
    if not rows:
        raise ConfigError("input", f"{path} has no rows")
    return rows


# ------------------------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------------------------


def score_row(row: dict, mode: str = "evolm", budget_s: Optional[float] = ROW_BUDGET_S) -> dict:
    """A copy of a (valid) row with the scored fields added. The row's slow checks share `budget_s` seconds (see
    :func:`evolm_nemo.answers.time_budget`); checks left unfinished are counted in ``unfinished_checks``."""
    with time_budget(budget_s) as budget:
        out = _score_row(row, mode)
    if budget.unfinished:
        out["unfinished_checks"] = budget.unfinished
    return out


def _score_row(row: dict, mode: str) -> dict:
    suite = row["suite"]
    gold = gold_answer(suite, row)
    completions = row["completions"]
    extracted = [extract_answer(c, mode) for c in completions]
    memo: dict = {}

    def same(a: Optional[str], b: Optional[str]) -> bool:
        key = (a, b)
        if key not in memo:
            memo[key] = is_equiv(suite, a, b, mode)
        return memo[key]

    correct = [same(e, gold) for e in extracted]
    greedy = row.get("greedy")
    pass1 = judge(suite, greedy, gold, mode) if greedy is not None else correct[0]
    maj = majority_index(completions, majority_answers(completions, mode=mode), same)
    rm = rm_index(row.get("rm_scores"))
    out = dict(row)
    out.update(
        gold_answer=gold,
        extracted=extracted,
        correct=correct,
        pass1=bool(pass1),
        maj16=bool(correct[maj]),
        rm16=None if rm is None else bool(correct[rm]),
        pass16=any(correct),
    )
    return out


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def score_rows(
    rows: Sequence[dict],
    mode: str = "evolm",
    workers: int = 1,
    progress: bool = False,
    validate: bool = True,
    budget_s: Optional[float] = ROW_BUDGET_S,
) -> tuple[list[dict], dict]:
    """Score rows in the `score` input format: (scored rows in input order, summary). `workers` > 1 scores rows
    concurrently (each worker thread gets its own math-verify helper process; 0 = one per CPU core). Each row's slow
    checks share `budget_s` seconds (None: unbounded)."""
    if mode not in MODES:
        raise ConfigError("scoring", f"expected one of {', '.join(MODES)}, got {mode!r}")
    if validate:
        for i, row in enumerate(rows):
            validate_row(row, f"row {i + 1}")
    workers = _default_workers() if workers <= 0 else workers
    bar = None
    if progress and len(rows) >= PROGRESS_MIN_ROWS:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc=f"score ({mode})", unit="problem", file=sys.stderr, dynamic_ncols=True)
    scored: list[dict] = []
    try:
        if workers == 1:
            for row in rows:
                scored.append(score_row(row, mode, budget_s))
                if bar is not None:
                    bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evolm-score") as pool:
                for result in pool.map(lambda r: score_row(r, mode, budget_s), rows, chunksize=1):
                    scored.append(result)
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return scored, summarize(scored)


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------


def completions_note(rows: Sequence[dict]) -> Optional[str]:
    """One line saying how many completions rows have when that is not EvoLM's 16 (the metrics are then Maj@n,
    RM@n and Pass@n for that n); None for 16 everywhere."""
    counts = sorted({len(r["completions"]) for r in rows})
    if counts == [16]:
        return None
    if len(counts) == 1:
        n = counts[0]
        return (f"note: n={n} completions per row (not 16): maj16 / rm16 / pass16 are Maj@{n} / RM@{n} / "
                f"Pass@{n} here")
    other = sum(len(r["completions"]) != 16 for r in rows)
    return (f"note: completions per row vary from n={counts[0]} to n={counts[-1]} ({other} of {len(rows)} rows have "
            f"other than 16): maj16 / rm16 / pass16 are over each row's own n")


def _default_output(input_path: str) -> str:
    p = Path(input_path)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return str(p.with_name(stem + ".scored.jsonl"))


def _format_table(summary: dict, mode: str) -> str:
    lines = [f"scoring={mode}", f"{'suite':<16}{'n':>6}{'pass1':>8}{'maj16':>8}{'rm16':>8}{'pass16':>8}{'ratio':>8}"]
    for name, m in summary.items():
        cells = [f"{100 * m[k]:8.2f}" if m[k] is not None else f"{'-':>8}" for k in
                 ("pass1", "maj16", "rm16", "pass16", "correct_ratio")]
        lines.append(f"{name:<16}{m['n']:>6}" + "".join(cells))
    return "\n".join(lines)


def main(overrides: Sequence[str]) -> int:
    cfg = compose("score", list(overrides), ScoreConfig)
    if not cfg.input:
        raise ConfigError("input", "required: evolm score input=<completions.jsonl> [output=<scored.jsonl>]")
    if cfg.scoring not in MODES:
        raise ConfigError("scoring", f"expected one of {', '.join(MODES)}, got {cfg.scoring!r}")
    if cfg.workers < 0:
        raise ConfigError("workers", f"expected 0 (auto) or a positive number, got {cfg.workers}")
    if cfg.row_budget_s is not None and not cfg.row_budget_s > 0:
        raise ConfigError("row_budget_s", f"expected seconds > 0 (or null: unbounded), got {cfg.row_budget_s}")
    if Path(cfg.input).expanduser().is_dir():
        raise ConfigError("input", f"{cfg.input} is a directory; name the completions JSONL in it")
    output = cfg.output or _default_output(cfg.input)
    check_writable(output, "output")
    check_dst_file(output, cfg.overwrite, "output", sources=(cfg.input,),  # never the input it reads; locked
                   ours=jsonl_with("correct", "extracted"), what="a scored JSONL (made by evolm score)")
    rows = read_rows(cfg.input)
    note = completions_note(rows)
    if note:
        print(note, file=sys.stderr)
    scored, summary = score_rows(rows, cfg.scoring, workers=cfg.workers, progress=cfg.progress, validate=False,
                                 budget_s=cfg.row_budget_s)
    write_jsonl(output, scored)
    cut = [r for r in scored if r.get("unfinished_checks")]
    if cut:
        print(f"{len(cut)} row(s) ran past the {cfg.row_budget_s:g} s time budget per row; their "
              f"{sum(r['unfinished_checks'] for r in cut)} unfinished checks count as not equivalent "
              f"(field unfinished_checks; first: id {cut[0]['id']!r}); raise row_budget_s to finish them",
              file=sys.stderr)
    print(_format_table(summary, cfg.scoring), file=sys.stderr)
    print(f"wrote {len(scored)} scored rows to {output}", file=sys.stderr)
    sys.stdout.write(json.dumps(summary, allow_nan=False) + "\n")
    sys.stdout.flush()
    return 0
