"""Issue 22: the strict checker on MATH's and GSM8K's hard answer forms. Equations, tuples, sets, vectors and matrices
are compared as what they are (no one-sided equation match), unit text and ``\\!`` thousands separators are ignored,
and a rambling completion's last stated final answer is the one judged. The evolm mode does not move."""

from __future__ import annotations

import pytest

from evolm_nemo import answers
from evolm_nemo.answers import extract_answer, is_equiv, judge

COT = "Let me work through it step by step. " * 20

# (prediction, gold, strict verdict): "must be wrong" rows are false positives the strict checker used to accept
EQUATIONS_TUPLES_SETS = [
    # an equation gold does not accept one of its sides
    ("0", "a^2 + b = 0", False),
    ("0", "2x - y + 3z + 8 = 0", False),  # a MATH plane
    ("2x - y + 3z + 8", "2x - y + 3z + 8 = 0", False),
    ("y", "y = 2x + 3", False),
    ("2x + 3", "y = 2x + 3", False),  # a line is an equation, not its right side
    # an equation matches the same relation, rearranged or scaled
    ("y=-\\frac12x+\\frac34", "2x+4y-3=0", True),
    ("-2x - 4y + 3 = 0", "2x+4y-3=0", True),
    ("y = 3 + 2x", "y = 2x + 3", True),
    ("2x + 3 = y", "y = 2x + 3", True),
    ("-4x + 2y - 6z - 16 = 0", "2x - y + 3z + 8 = 0", True),
    ("2x+4y+3=0", "2x+4y-3=0", False),
    ("y = 2x + 4", "y = 2x + 3", False),
    # a value assignment and a function definition are their value
    ("x = 5", "5", True),
    ("k = \\frac{3}{4}", "\\frac34", True),
    ("f(x) = 2x + 3", "2x+3", True),
    # tuples in order, sets as sets, an ordered pair is neither a set nor an unordered list
    ("(3, 1)", "(3,1)", True),
    ("3, 1", "(3,1)", True),  # a bare pair in order
    ("(1,3)", "(3,1)", False),
    ("\\{1,3\\}", "(3,1)", False),
    ("1,3", "(3,1)", False),
    ("\\{3, 1\\}", "\\{1,3\\}", True),
    ("\\{1, 2\\}", "\\{1,3\\}", False),
    ("\\{-2, 3\\}", "-2, 3", True),  # a set of solutions and the list of them
    ("(2, 3, -1)", "(2,3,-1)", True),
    ("(2, -1, 3)", "(2,3,-1)", False),
]

MATRICES = [
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} -1/3 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 0.5 & 1 \\\\ 2 & \\sqrt{4} \\end{pmatrix}",
     "\\begin{pmatrix} \\frac{1}{2} & 1 \\\\ 2 & 2 \\end{pmatrix}", True),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),  # order
    ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),  # shape
    ("\\begin{pmatrix} 1 \\\\ 2 \\\\ 0 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ("2", "\\begin{pmatrix} 2 \\end{pmatrix}", False),
    ("\\begin{pmatrix} x \\\\ 2x \\end{pmatrix}", "\\begin{pmatrix} x \\\\ x+x \\end{pmatrix}", True),
]

UNITS_AND_SEPARATORS = [
    ("1/3", "\\frac{1}{3} \\text{meters}", True),
    ("125", "125\\textnormal{ miles}", True),
    ("15", "15\\mbox{ cm}^2", True),
    ("2\\sqrt{5} \\text{ units}", "2\\sqrt5", True),
    ("12 \\mathrm{cm}", "12", True),
    ("14", "15\\mbox{ cm}^2", False),
    ("\\text{Thursday}", "Thursday", True),  # a lone text is the answer itself
    ("2", "2\\mathrm{x}", False),  # a one-letter roman text may be a variable: kept
    ("32349", "32,\\! 349", True),
    ("32349", "32,\\!349", True),
    ("32,349", "32,\\! 349", True),
    ("32348", "32,\\! 349", False),
    ("1,234,567", "1234567", True),
]

PAIRS = EQUATIONS_TUPLES_SETS + MATRICES + UNITS_AND_SEPARATORS


@pytest.mark.parametrize("pred, gold, strict", PAIRS)
def test_strict_forms(pred, gold, strict):
    assert is_equiv("math", pred, gold, "strict") is strict
    assert is_equiv("math", gold, pred, "strict") is strict  # symmetric
    assert judge("math", COT + f"So the answer is \\boxed{{{pred}}}.", gold, "strict") is strict


def test_fast_path_agrees_with_sympy_path_on_the_new_forms():
    decided = 0
    for pred, gold, strict in PAIRS:
        fast = answers.fast_verdict("math", pred, gold, "strict")
        slow = answers.slow_equiv_inprocess("strict", pred, gold, None)
        assert slow is strict, (pred, gold)
        if fast is not None:
            decided += 1
            assert fast is strict, (pred, gold)
    assert decided >= 20  # false positives of form, numeric matrices, units and separators: no sympy


def test_numeric_matrices_and_mismatched_forms_need_no_sympy():
    for pred, gold, verdict in [
        ("\\begin{pmatrix} -1/3 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix} -\\frac13 \\\\ 2 \\end{bmatrix}", True),
        ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
        ("0", "a^2 + b = 0", False), ("\\{1,3\\}", "(3,1)", False), ("125", "125\\textnormal{ miles}", True),
        ("32349", "32,\\! 349", True),
    ]:
        assert answers.fast_verdict("math", pred, gold, "strict") is verdict, (pred, gold)


# (completion's last words, suite, gold, strict extraction, strict verdict)
RAMBLING = [
    ("We get \\boxed{255}. Wait, that ignores the second shop. Adding it, the final answer is $10,455$.",
     "gsm8k_platinum", "10455", "$10,455$", True),
    ("We get \\boxed{10455}. Let me double-check: yes, the answer is correct.",
     "gsm8k_platinum", "10455", "10455", True),  # a later "answer is" that only judges the box
    ("First I thought the answer is 12. After checking, it is \\boxed{14}.", "gsm8k_platinum", "14", "14", True),
    ("The answer is 8:30 A.M.", "tabmwp", "8:30 A.M.", "8:30 A.M.", True),  # no cut at the clock's colon
    ("The answer is 45. Note: the units are minutes.", "gsm8k_platinum", "45", "45", True),  # a later colon
    ("So the answer is as follows: 45, as computed.", "gsm8k_platinum", "45", "45", True),  # a label's colon
    ("The answer is: $\\frac{1}{3}$ meters.", "math", "\\frac13", "$\\frac{1}{3}$ meters", True),
    ("\\boxed{255} is what I first got, but the answer is 256.", "gsm8k_platinum", "255", "256", False),
]


@pytest.mark.parametrize("ending, suite, gold, extracted, strict", RAMBLING)
def test_the_last_stated_answer_wins(ending, suite, gold, extracted, strict):
    completion = COT + ending
    assert extract_answer(completion, "strict") == extracted
    assert judge(suite, completion, gold, "strict") is strict


# evolm verdicts of PAIRS (T/F in order), recorded before the strict changes: the reference's quirks stay ("0" is
# "a^2 + b = 0", "1/3" is "\\frac{1}{3} \\text{meters}" by its leading number, "32,\\! 349" is not 32349)
EVOLM_BEFORE = "TTFFTFTFTTTFTFFFFFFFFFTFFFTTTFTFTFTTTTTFFTFFFFT"


def test_evolm_mode_does_not_move():
    assert len(EVOLM_BEFORE) == len(PAIRS)
    for (pred, gold, _), verdict in zip(PAIRS, EVOLM_BEFORE):
        assert is_equiv("math", pred, gold, "evolm") is (verdict == "T"), (pred, gold)
    completion = COT + RAMBLING[0][0]
    assert extract_answer(completion, "evolm") == "255"  # the reference: a box beats "answer is"
    assert extract_answer(COT + "The answer is 8:30 A.M.", "evolm") == "30 A.M."  # cut after the last ':'


def test_clock_times_with_or_without_a_space():
    assert is_equiv("tabmwp", "12:34A.M.", "12:34 A.M.", "strict")
    assert is_equiv("tabmwp", "10am", "10 A.M.", "strict")
    assert not is_equiv("tabmwp", "10am", "10 P.M.", "strict")


def test_a_membership_or_value_is_not_an_equation():
    assert is_equiv("math", "x \\in [2,5)", "[2,5)", "strict")  # math-verify parses it as x = [2,5)
    assert not is_equiv("math", "x \\in [2,5]", "[2,5)", "strict")
    assert is_equiv("math", "x = 2\\pi", "2\\pi", "strict")
