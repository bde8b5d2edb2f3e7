"""Gold answers of cooked rows."""

from __future__ import annotations

from evolm_nemo.answers.common import _check_suite
from evolm_nemo.answers.extract import last_boxed, unbox
from evolm_nemo.answers.nli import _nli_label_evolm


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
