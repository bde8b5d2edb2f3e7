"""Task registry (evaluation/tasks.py + eval/tasks/*.yaml): definitions, local loading, hub-row cooking."""

from __future__ import annotations

import json

import pytest

from evolm_nemo.config.errors import ConfigError
from evolm_nemo.evaluation.tasks import TASKS, cook_row, get_task, load_problems
from evolm_nemo.tasks import ID_SUITES, OOD_SUITES, STOP, TEMPLATE
from tests.conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "eval"


def test_registry_has_the_six_suites():
    assert list(TASKS) == ["gsm8k_platinum", "math", "cruxeval", "boardgameqa", "tabmwp", "strategyqa"]
    assert ID_SUITES == ("gsm8k_platinum", "math") and all(TASKS[s].group == "id" for s in ID_SUITES)
    assert OOD_SUITES == ("cruxeval", "boardgameqa", "tabmwp", "strategyqa")
    assert all(TASKS[s].group == "ood" for s in OOD_SUITES)
    assert sum(t.size for t in TASKS.values()) == 1209 + 5000 + 800 + 500 + 1000 + 500
    for task in TASKS.values():
        assert task.stop == STOP == ("Human", "Human:", "Assistant", "Assistant:")
        assert task.template == TEMPLATE and task.prompt("What is {x}?") == "Human: What is {x}?\nAssistant:"
    assert get_task("cruxeval").equivalence == "crux" and get_task("strategyqa").equivalence == "nli"
    assert get_task(TASKS["math"]) is TASKS["math"]
    with pytest.raises(ConfigError, match="unknown task 'gsm8k'"):
        get_task("gsm8k")


def test_load_local_cooked_jsonl():
    for name in TASKS:
        rows = load_problems(name, path=str(FIXTURES / f"{name}.jsonl"))
        assert rows and all(set(r) >= {"id", "problem", "gt_solution", "gt_answer"} for r in rows)
        assert TASKS[name].gold(rows[0])
    assert len(load_problems("math", path=str(FIXTURES / "math.jsonl"), limit=2)) == 2
    assert get_task("gsm8k_platinum").gold(load_problems("gsm8k_platinum", str(FIXTURES / "gsm8k_platinum.jsonl"))[0]) \
        == "150"


def test_bad_local_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_problems("math", path=str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "problem": "p", "gt_solution": "\\\\boxed{x}", "gt_answer": null}\n{"id": 2, "problem": "p"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: field 'gt_solution': missing"):
        load_problems("math", path=str(bad))
    with pytest.raises(ConfigError, match="has no hub source"):
        load_problems("tabmwp")

    # what scoring refuses after all the sampling is refused when the problems are read, before any model loads
    for row, field in [('{"id": 1, "problem": "p", "gt_solution": null, "gt_answer": true}', "gt_answer"),
                       ('{"id": 1, "problem": "p", "gt_solution": null, "gt_answer": ["True"]}', "gt_answer"),
                       ('{"id": null, "problem": "p", "gt_solution": null, "gt_answer": "1"}', "id"),
                       ('{"id": 1, "problem": "p", "gt_solution": null, "gt_answer": NaN}', "gt_answer"),
                       ('{"id": 1, "problem": "p", "gt_solution": null, "gt_answer": "maybe"}', "gt_answer"),
                       ('{"id": 1, "problem": "p", "gt_solution": "perhaps", "gt_answer": null}', "gt_answer")]:
        bad.write_text('{"id": 0, "problem": "p", "gt_solution": null, "gt_answer": "True"}\n' + row + "\n")
        with pytest.raises(ConfigError, match=rf"bad.jsonl:2: field '{field}': "):
            load_problems("strategyqa", path=str(bad))
    # a problem twice would be sampled and counted twice
    bad.write_text('{"id": "a", "problem": "p", "gt_solution": "#### 1", "gt_answer": null}\n'
                   '{"id": "b", "problem": "q", "gt_solution": "#### 2", "gt_answer": null}\n'
                   '{"id": "a", "problem": "p", "gt_solution": "#### 1", "gt_answer": null}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:3: field 'id': \"a\" again \(first at .*bad.jsonl:1\)"):
        load_problems("gsm8k_platinum", path=str(bad))
    assert len(load_problems("gsm8k_platinum", path=str(bad), limit=2)) == 2
    # a GSM8K gold given as a bare number (no "#### " line to find) is the gold itself: kept
    bad.write_text('{"id": 1, "problem": "p", "gt_solution": 42, "gt_answer": null}\n')
    assert load_problems("gsm8k_platinum", path=str(bad))[0]["gt_solution"] == 42


@pytest.mark.parametrize("row,field", [
    ('{"id": 1, "problem": "p", "gt_solution": "#### 5", "gt_answer": ""}', "gt_answer"),
    ('{"id": 1, "problem": "p", "gt_solution": "#### 5", "gt_answer": "  "}', "gt_answer"),
    ('{"id": 1, "problem": "", "gt_solution": "#### 5", "gt_answer": null}', "problem"),
    ('{"id": 1, "problem": " \\n", "gt_solution": "#### 5", "gt_answer": "5"}', "problem"),
])
def test_an_empty_problem_or_gold_answer_is_refused_when_read(tmp_path, row, field):
    """An empty gt_answer is taken as the gold (gt_solution is not read), and "" matches no completion: every one was
    scored wrong without a word; an empty problem was sampled as a prompt asking nothing. Both are one line naming
    file:line and the field, when the problems are read (before any model loads)."""
    bad = tmp_path / "gsm8k_platinum.jsonl"
    bad.write_text('{"id": 0, "problem": "p", "gt_solution": "#### 1", "gt_answer": null}\n' + row + "\n")
    with pytest.raises(ConfigError, match=rf"gsm8k_platinum.jsonl:2: field '{field}': "):
        load_problems("gsm8k_platinum", path=str(bad))


def _fixture(name):
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def test_cooking_hub_rows_reproduces_evolms_problem_text():
    # StrategyQA: rebuild the hub row (facts list, question, bool answer) from EvoLM's cooked text
    for row in _fixture("strategyqa"):
        head, question = row["problem"].rsplit("\n", 1)
        facts = [f.split(". ", 1)[1] for f in head.split("\n\n")[0].splitlines()[1:]]
        hub = {"qid": row["id"].split("-", 1)[1], "facts": facts, "question": question,
               "answer": row["gt_answer"] == "True"}
        assert cook_row(TASKS["strategyqa"].hf, hub, 0) == row
    # BoardgameQA: label names and the instruction prefix
    prefix = 'Solve the following problem. Your final answer should be "True", "False", or "Uncertain".\n\n'
    labels = {"True": "proved", "False": "disproved", "Uncertain": "unknown"}
    for row in _fixture("boardgameqa"):
        hub = {"example": row["problem"][len(prefix):], "label": labels[row["gt_answer"]]}
        cooked = cook_row(TASKS["boardgameqa"].hf, hub, 7)
        assert {k: cooked[k] for k in ("problem", "gt_solution", "gt_answer")} == \
            {k: row[k] for k in ("problem", "gt_solution", "gt_answer")}
    assert cook_row(TASKS["boardgameqa"].hf, {"example": "word " * 2000, "label": "proved"}, 0) is None
    # CRUXEval: code / input / output fields
    for row in _fixture("cruxeval"):
        text = row["problem"]
        code = text.split("You are given the following function:\n\n", 1)[1].split("\n\nYou are also given", 1)[0]
        inp = text.split("in the function):\n\n", 1)[1].split("\n\nWith the given function", 1)[0]
        hub = {"id": row["id"].split("-", 1)[1], "code": code, "input": inp, "output": row["gt_answer"]}
        assert cook_row(TASKS["cruxeval"].hf, hub, 0) == row
    # GSM8K-Platinum: question / answer
    row = _fixture("gsm8k_platinum")[0]
    cooked = cook_row(TASKS["gsm8k_platinum"].hf, {"question": row["problem"], "answer": row["gt_solution"]}, 382)
    assert cooked == {**row, "id": "GSM8KPlatinum-0382"}


def test_hub_rows_are_cooked_and_checked_like_a_local_file(tmp_path):
    """The hub path (``datasets.load_dataset``) on a local dataset directory: rows are cooked by the task's recipe,
    and a row whose gold answer scoring could not find is refused when the problems are read, naming the row."""
    import dataclasses

    spec = {**TASKS["gsm8k_platinum"].hf, "path": str(tmp_path / "hub"), "configs": [None]}
    task = dataclasses.replace(TASKS["gsm8k_platinum"], hf=spec)
    (tmp_path / "hub").mkdir()
    rows = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}, {"question": "And 4*4?", "answer": "#### 16"}]
    (tmp_path / "hub" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cooked = load_problems(task)
    assert [p["id"] for p in cooked] == ["GSM8KPlatinum-0000", "GSM8KPlatinum-0001"]
    assert [task.gold(p) for p in cooked] == ["5", "16"] and cooked[1]["problem"] == "And 4*4?"
    assert len(load_problems(task, limit=1)) == 1
    rows.append({"question": "No gold here", "answer": "the answer is 7"})
    (tmp_path / "hub" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"hub test row 2: field 'gt_answer': null, and gt_solution .* holds no gold"):
        load_problems(task)
