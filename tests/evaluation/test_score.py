"""`evolm score` (evaluation/score.py): the stable input/output contract, both modes, end to end and on bad input."""

from __future__ import annotations

import json

import pytest

from evolm_nemo import cli
from evolm_nemo.evaluation.score import ADDED_FIELDS, score_rows
from tests.conftest import REPO, run_evolm

FIXTURES = REPO / "tests" / "fixtures" / "eval"


def _fixture(suite: str, i: int) -> dict:
    return json.loads((FIXTURES / f"{suite}.jsonl").read_text(encoding="utf-8").splitlines()[i])


def _row(suite: str, i: int, completions: list[str], **extra) -> dict:
    return {"suite": suite, **_fixture(suite, i), "completions": completions, **extra}


def _boxed(x: str, n: int) -> list[str]:
    return [f"Let me work it out step by step. So the result is \\boxed{{{x}}}."] * n


def hand_built_rows() -> list[dict]:
    """Five real problems with 16 hand-written completions each; verdicts worked out by hand below."""
    gsm = _boxed("140", 5) + _boxed("\\$150", 6) + _boxed("150", 3) + ["I am not sure."] * 2
    scores = [0.0] * 16
    scores[13] = 2.5  # a "\boxed{150}"
    return [
        _row("gsm8k_platinum", 0, gsm, rm_scores=scores, greedy="So the total is \\boxed{\\$150}.",
             meta={"kept": True}),
        _row("strategyqa", 0, _boxed("Not sure", 7) + _boxed("True", 5) + _boxed("False", 4)),
        _row("cruxeval", 2, _boxed("True", 9) + _boxed("1", 7)),
        _row("tabmwp", 1, _boxed("Wednesday", 10) + _boxed("Tuesday", 6)),
        _row("math", 4, _boxed("2.625", 4) + _boxed("\\frac{21}{8}", 4) + _boxed("3", 5) + _boxed("\\dfrac{21}{8}", 3)),
    ]


EXPECTED = {
    # suite: (pass1, maj16, rm16, pass16, #correct) per mode
    "evolm": {
        "gsm8k_platinum": (False, False, True, True, 3),  # \$150 is no answer for math-verify; 140 has the majority
        "strategyqa": (True, True, None, True, 11),  # "Not sure" counts as false (contains "no")
        "cruxeval": (True, True, None, True, 16),  # True == 1
        "tabmwp": (False, False, None, False, 0),  # text answers never match
        "math": (True, True, None, True, 8),  # \dfrac is no answer
    },
    "strict": {
        "gsm8k_platinum": (True, True, True, True, 9),
        "strategyqa": (False, False, None, True, 4),
        "cruxeval": (False, False, None, True, 7),
        "tabmwp": (True, True, None, True, 10),
        "math": (True, True, None, True, 11),
    },
}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.mark.parametrize("mode", ["evolm", "strict"])
def test_score_rows_hand_built(mode):
    rows = hand_built_rows()
    scored, summary = score_rows(rows, mode)
    for row, out in zip(rows, scored):
        pass1, maj16, rm16, pass16, n_correct = EXPECTED[mode][row["suite"]]
        assert (out["pass1"], out["maj16"], out["rm16"], out["pass16"]) == (pass1, maj16, rm16, pass16), row["suite"]
        assert sum(out["correct"]) == n_correct and len(out["correct"]) == 16 and len(out["extracted"]) == 16
        assert {k: out[k] for k in row} == row  # the input row is kept, extra fields included
    assert scored[0]["gold_answer"] == "150" and scored[0]["extracted"][5] == "\\$150"
    assert scored[4]["gold_answer"] == "\\frac{21}{8}"
    ratio = {s: v[4] / 16 for s, v in EXPECTED[mode].items()}
    for suite, (pass1, maj16, rm16, pass16, _) in EXPECTED[mode].items():
        m = dict(summary[suite])
        rm_scores = next(r for r in scored if r["suite"] == suite).get("rm_scores")
        assert m.pop("rm_score_mean") == (sum(rm_scores) / len(rm_scores) if rm_scores else None)
        assert m == {"n": 1, "pass1": float(pass1), "maj16": float(maj16),
                     "rm16": None if rm16 is None else float(rm16), "pass16": float(pass16),
                     "correct_ratio": ratio[suite] if ratio[suite] else None}
    ids = ("gsm8k_platinum", "math")
    assert summary["id_avg"]["pass1"] == pytest.approx(sum(EXPECTED[mode][s][0] for s in ids) / 2)
    assert summary["id_avg"]["correct_ratio"] == pytest.approx(sum(ratio[s] for s in ids) / 2)
    assert summary["id_avg"]["rm16"] == 1.0 and summary["ood_avg"]["rm16"] is None
    assert summary["ood_avg"]["n"] == 3


def test_score_rows_parallel_equals_serial():
    rows = hand_built_rows() * 3
    assert score_rows(rows, "evolm", workers=3) == score_rows(rows, "evolm", workers=1)


def test_evolm_score_cli_end_to_end(tmp_path):
    rows = hand_built_rows()
    inp, out = tmp_path / "completions.jsonl", tmp_path / "scored.jsonl"
    _write(inp, rows)
    for mode in ("evolm", "strict"):
        proc = run_evolm("score", [f"input={inp}", f"output={out}", f"scoring={mode}", "workers=2",
                                   "overwrite=true"])  # the second mode replaces the first one's file
        summary = json.loads(proc.stdout.strip().splitlines()[-1])  # the last stdout line is the summary
        scored = [json.loads(line) for line in out.read_text().splitlines()]
        expect_rows, expect_summary = score_rows(rows, mode)
        assert scored == json.loads(json.dumps(expect_rows))
        assert summary == json.loads(json.dumps(expect_summary))
        assert list(summary) == ["gsm8k_platinum", "math", "cruxeval", "tabmwp", "strategyqa", "id_avg", "ood_avg"]
        for row in scored:
            assert all(k in row for k in ADDED_FIELDS)
        assert f"scoring={mode}" in proc.stderr
    # default output path: next to the input
    run_evolm("score", [f"input={inp}", "progress=false"])
    assert (tmp_path / "completions.scored.jsonl").is_file()


BAD = [
    ('{"suite": "math", "id": 1',
     "not valid JSON"),
    ('[1, 2]', "expected a JSON object, got list"),
    ('{"id": 1, "problem": "p", "gt_solution": "#### 1", "gt_answer": null, "completions": ["a"]}',
     "field 'suite': missing"),
    ('{"suite": "gsm8k", "id": 1, "problem": "p", "gt_solution": "#### 1", "gt_answer": null, "completions": ["a"]}',
     "field 'suite': expected one of"),
    ('{"suite": "math", "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": ["a"]}',
     "field 'id': missing"),
    ('{"suite": "math", "id": 1, "gt_solution": "x", "gt_answer": "1", "completions": ["a"]}',
     "field 'problem': missing"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": null, "gt_answer": null, "completions": ["a"]}',
     "field 'gt_answer': null, and no gt_solution"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": ["1"], "completions": ["a"]}',
     "field 'gt_answer': expected a string or null"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1"}',
     "field 'completions': missing"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": []}',
     "field 'completions': expected a non-empty list of strings"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": ["a", 3]}',
     "field 'completions': item 1 is int"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": ["a"], '
     '"rm_scores": [1.0, 2.0]}', "field 'rm_scores': has 2 scores for 1 completions"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": ["a"], '
     '"rm_scores": ["high"]}', "field 'rm_scores': expected a list of numbers"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "x", "gt_answer": "1", "completions": ["a"], '
     '"greedy": 5}', "field 'greedy': expected a string"),
    # no gold answer scoring could ever match: refused, not scored 0
    ('{"suite": "gsm8k_platinum", "id": 1, "problem": "p", "gt_solution": "2 + 2 = 4", "gt_answer": null, '
     '"completions": ["a"]}', "field 'gt_answer': null, and gt_solution \"2 + 2 = 4\" holds no gold answer"),
    ('{"suite": "math", "id": 1, "problem": "p", "gt_solution": "no box", "gt_answer": null, "completions": ["a"]}',
     "field 'gt_answer': null, and gt_solution \"no box\" holds no gold answer"),
    ('{"suite": "boardgameqa", "id": 1, "problem": "p", "gt_solution": null, "gt_answer": "proved", '
     '"completions": ["a"]}', "field 'gt_answer': \"proved\" is not a boardgameqa label"),
    ('{"suite": "boardgameqa", "id": 1, "problem": "p", "gt_solution": "maybe", "gt_answer": null, '
     '"completions": ["a"]}', "field 'gt_answer': null, and gt_solution \"maybe\" holds no gold answer"),
    ('{"suite": "strategyqa", "id": 1, "problem": "p", "gt_solution": null, "gt_answer": "Not sure", '
     '"completions": ["a"]}', "field 'gt_answer': \"Not sure\" is not a strategyqa label"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_malformed_row_is_one_line_naming_line_and_field(tmp_path, capsys, bad, message):
    good = json.dumps(hand_built_rows()[1])
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(good + "\n\n" + bad + "\n" + good + "\n", encoding="utf-8")  # the bad row is on line 3
    assert cli.main(["score", f"input={inp}", f"output={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(f"error: {inp}:3: ") and message in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl.*"))  # no partial output


def test_malformed_input_via_subprocess(tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(json.dumps(hand_built_rows()[1]) + "\n" + BAD[8][0] + "\n", encoding="utf-8")
    proc = run_evolm("score", [f"input={inp}", f"output={out}"], check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"error: {inp}:2: field 'completions': missing"
    assert not out.exists()


def test_bad_settings(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    _write(inp, hand_built_rows()[:1])
    for args, first in [([], "error: input: required"), ([f"input={tmp_path / 'nope.jsonl'}"], "error: input: no such"),
                        ([f"input={inp}", "scoring=loose"], "error: scoring: expected one of evolm, strict"),
                        ([f"input={inp}", "workers=-1"], "error: workers:"),
                        ([f"input={inp}", "bogus=1"], "error: bogus: unknown key")]:
        assert cli.main(["score", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(first), (args, err)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert cli.main(["score", f"input={empty}"]) == 2
    assert "has no rows" in capsys.readouterr().err
