"""Answer extraction and equivalence for the six downstream suites, shared by evaluation, SFT filtering and the RL
reward (so it lives outside ``evolm_nemo.evaluation``).

Two modes:

* ``evolm`` (default) reproduces, verdict for verdict, the evaluator of EvoLM's released cot-eval-harness
  (``Evaluator.py`` driven by ``evaluate_responses.py``) with math-verify 0.3.3, quirks included, so that our numbers
  are comparable with the paper's. Math suites compare the bare strings with ``verify(parse(a), parse(b))`` OR-ed over
  both orders; CRUXEval strips single quotes and compares ``ast.literal_eval`` values; BoardgameQA / StrategyQA map an
  answer to true / false / uncertain by substring words.
* ``strict`` is the scorer a careful user wants. It fixes the reference's quirks: answers are normalised (``\\$``,
  ``\\text{}``, ``\\dfrac``, ``\\frac65``, units, thousands separators) and parsed as one delimited LaTeX expression, so
  ``6\\sqrt{8}`` no longer matches ``6\\sqrt{7}`` and tuples, intervals and ``\\sqrt{..}`` work; forms must agree (an
  equation gold is not matched by one of its sides, an ordered pair not by a set), equations compare as relations and
  matrices entry by entry; the last stated final answer is judged; text answers compare as
  normalised text; CRUXEval compares Python literals without stripping quotes and keeps ``True`` apart from ``1``; the
  true/false/uncertain words are matched as whole words, so "Not sure" and "None" are no answer.

Modules: ``extract`` (the model's answer), ``gold`` (the gold answer), ``nli`` / ``crux`` / ``math_evolm`` /
``math_strict`` (each kind's rules), ``fast`` (plain numbers without sympy), ``guards`` (huge evaluations),
``verifier`` (math-verify), ``pool`` (helper processes, bounded checks), ``budget`` (time budgets per row),
``equiv`` (:func:`is_equiv`, :func:`judge`). Names with a leading underscore are private to this package.
"""

from evolm_nemo.answers.budget import MIN_CHECK_S, TimeBudget, time_budget
from evolm_nemo.answers.common import MODES, TIMEOUT_S
from evolm_nemo.answers.equiv import fast_verdict, is_equiv, judge, stats
from evolm_nemo.answers.extract import extract_answer, last_boxed, strict_cut, unbox
from evolm_nemo.answers.gold import gold_answer
from evolm_nemo.answers.guards import HUGE_DIGITS, huge_evaluation
from evolm_nemo.answers.math_strict import strict_normalize
from evolm_nemo.answers.nli import nli_label
from evolm_nemo.answers.pool import slow_direction_inprocess, slow_equiv_inprocess
from evolm_nemo.tasks import SUITE_KIND, SUITES

__all__ = [
    "HUGE_DIGITS", "MIN_CHECK_S", "MODES", "SUITES", "SUITE_KIND", "TIMEOUT_S", "TimeBudget", "extract_answer",
    "fast_verdict", "gold_answer", "huge_evaluation", "is_equiv", "judge", "last_boxed", "nli_label",
    "slow_direction_inprocess", "slow_equiv_inprocess", "stats", "strict_cut", "strict_normalize", "time_budget",
    "unbox",
]
