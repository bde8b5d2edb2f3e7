"""Metric definitions (evaluation/metrics.py) on small hand-built cases."""

from __future__ import annotations

import math

import pytest

from evolm_nemo.answers import is_equiv
from evolm_nemo.evaluation.metrics import (
    correct_ratio,
    group_average,
    majority_answers,
    majority_index,
    rm_index,
    suite_summary,
    summarize,
)
from evolm_nemo.evaluation.score import score_row

PAD = "x" * 200  # pushes what precedes it out of the last 128 characters


def _same_math(a, b):
    return is_equiv("gsm8k_platinum", a, b, "evolm")


def _maj(completions, same=_same_math):
    return majority_index(completions, majority_answers(completions), same)


def test_majority_largest_cluster_wins():
    c = ["\\boxed{1}", "\\boxed{2}", "\\boxed{2.0}", "the answer is 2", "\\boxed{1}"]
    assert _maj(c) == 1  # {2, 2.0, 2} beats {1, 1}; the verdict is that cluster's first completion


def test_majority_tie_goes_to_the_earliest_cluster():
    assert _maj(["\\boxed{3}", "\\boxed{4}", "\\boxed{4}", "\\boxed{3}"]) == 0
    assert _maj(["\\boxed{4}", "\\boxed{3}", "\\boxed{3}", "\\boxed{4}"]) == 0
    assert _maj(["no answer", "\\boxed{5}", "still none"]) == 0  # all singletons: the first


def test_majority_no_answer_completions_are_singletons():
    # three completions without an answer do not form a cluster; the two 7s win
    assert _maj(["I don't know", "I don't know", "I don't know", "\\boxed{7}", "\\boxed{7}"]) == 3


def test_majority_uses_only_the_last_128_characters():
    cut = "\\boxed{9} " + PAD  # the answer is more than 128 characters from the end: no vote
    assert majority_answers([cut, "\\boxed{9}"]) == [None, "9"]
    # two "9" in full text, but only one vote for 9 within the last 128 characters: the two 5s win
    assert _maj([cut, cut, "\\boxed{9}", "\\boxed{5}", "\\boxed{5}"]) == 3
    # a box cut in half by the 128-character window
    half = "\\boxed{" + "1" * 130 + "}"
    assert majority_answers([half]) == [None]


def test_majority_votes_use_the_scoring_modes_extraction():
    votes = ["The answer is 56, as we know.", "The answer is 56 dollars."]
    assert majority_answers(votes) == ["56, as we know.", "56 dollars."]
    assert majority_answers(votes, mode="strict") == ["56", "56 dollars"]


def test_majority_verdict_is_judged_on_the_full_text():
    # the winning cluster's first completion ends with "answer is 4" in its last 128 characters, but its full text has
    # a \boxed{3} earlier, which is what correctness (extraction on the full text) sees
    tricky = "\\boxed{3} " + PAD + " so the answer is 4"
    rows = {"suite": "gsm8k_platinum", "id": 1, "problem": "p", "gt_solution": "#### 3", "gt_answer": None,
            "completions": [tricky, "the answer is 4", "\\boxed{3}"]}
    scored = score_row(rows)
    assert scored["extracted"] == ["3", "4", "3"]
    assert scored["correct"] == [True, False, True]
    assert scored["maj16"] is True  # cluster {tricky, "4"} wins; tricky judged on its full text is correct


def test_majority_first_fit_against_each_clusters_first_member():
    # equivalence that is not transitive: 'ab' ~ 'a' and 'ab' ~ 'b' but 'a' !~ 'b'
    def same(x, y):
        return x == y or {x, y} in ({"ab", "a"}, {"ab", "b"})

    answers = ["a", "b", "ab", "ab", "b"]
    completions = [f"\\boxed{{{x}}} #{i}" for i, x in enumerate(answers)]
    # 'a' -> C0; 'b' -> C1; 'ab' joins C0 (first fit); 'ab' joins C0; 'b' joins C1 -> C0 has 3
    assert majority_index(completions, answers, same) == 0
    assert majority_index(completions, ["b", "a", "ab", "ab", "a"], same) == 0
    # against the FIRST member only: the 'b's do not join {'a', 'ab'} although 'b' ~ 'ab'
    assert majority_index(completions, ["a", "ab", "b", "b", "b"], same) == 2


def test_majority_index_of_identical_text_is_the_first_occurrence():
    completions = ["\\boxed{2}", "\\boxed{1}", "\\boxed{1}", "\\boxed{1}"]
    assert _maj(completions) == 1
    with pytest.raises(ValueError):
        majority_index([], [], _same_math)


def test_rm_index_is_numpy_argmax():
    assert rm_index([0.1, 0.9, 0.3]) == 1
    assert rm_index([0.5, 0.9, 0.9, 0.2]) == 1  # ties to the first
    assert rm_index([-1.0, -1.0]) == 0
    assert rm_index([0.1, math.nan, 5.0]) == 1  # numpy.argmax returns the first NaN
    assert rm_index([3, 7, 7]) == 1
    assert rm_index(None) is None
    assert rm_index([]) is None


def test_correct_ratio_is_a_conditional_mean():
    corrects = [[True] * 4 + [False] * 12, [False] * 16, [True] * 16, [False] * 16]
    assert correct_ratio(corrects) == pytest.approx((4 / 16 + 16 / 16) / 2)  # problems with no correct are skipped
    assert correct_ratio([[False] * 16]) is None  # undefined, not 0: a group average leaves it out
    assert correct_ratio([]) is None
    per_suite = {s: {"n": 1, **dict.fromkeys(("pass1", "maj16", "rm16", "pass16"), 0.0), "correct_ratio": c}
                 for s, c in (("cruxeval", 0.5), ("tabmwp", correct_ratio([[False]])))}
    assert group_average(per_suite, ["cruxeval", "tabmwp"])["correct_ratio"] == 0.5


def _row(suite, correct, pass1, maj16, rm16):
    return {"suite": suite, "correct": correct, "pass1": pass1, "maj16": maj16, "rm16": rm16,
            "pass16": any(correct)}


def test_suite_summary_and_group_averages():
    rows = [
        _row("gsm8k_platinum", [True, False, False, False], True, False, True),
        _row("gsm8k_platinum", [False] * 4, False, False, False),
        _row("math", [True, True, False, False], False, True, None),
        _row("cruxeval", [True] * 4, True, True, None),
        _row("strategyqa", [False, True, False, False], False, False, None),
    ]
    s = summarize(rows)
    assert list(s) == ["gsm8k_platinum", "math", "cruxeval", "strategyqa", "id_avg", "ood_avg"]
    assert s["gsm8k_platinum"] == {"n": 2, "pass1": 0.5, "maj16": 0.0, "rm16": 0.5, "pass16": 0.5,
                                   "correct_ratio": 0.25, "rm_score_mean": None}  # (rows without rm_scores)
    assert s["math"]["rm16"] is None  # no reward-model scores
    assert s["math"]["correct_ratio"] == 0.5
    assert s["id_avg"] == {"n": 3, "pass1": 0.25, "maj16": 0.5, "rm16": 0.5, "pass16": 0.75,
                           "correct_ratio": pytest.approx(0.375)}
    assert s["ood_avg"]["n"] == 2 and s["ood_avg"]["pass16"] == 1.0 and s["ood_avg"]["rm16"] is None
    assert s["ood_avg"]["correct_ratio"] == pytest.approx((1.0 + 0.25) / 2)
    for name, m in s.items():
        for key in ("pass1", "maj16", "pass16", "correct_ratio"):
            assert 0.0 <= m[key] <= 1.0, (name, key)
    empty = group_average({}, ["math"])
    assert empty == {"n": 0, "pass1": None, "maj16": None, "rm16": None, "pass16": None, "correct_ratio": None}
    assert suite_summary([_row("math", [False], False, False, None)])["correct_ratio"] is None
