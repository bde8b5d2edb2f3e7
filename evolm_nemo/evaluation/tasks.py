"""The six downstream suites' data. The suites themselves (names, ID/OOD groups, equivalence kinds) are in
:mod:`evolm_nemo.tasks`; each suite's definition (prompt template, stop strings, hub source and how to cook its rows
into EvoLM's schema) is data in ``eval/tasks/<suite>.yaml``; this module loads it (its group must be the registry's)
and gives the suite's gold answers (from :mod:`evolm_nemo.answers`).

Problems come from a local JSONL in EvoLM's cooked schema ``{"id", "problem", "gt_solution", "gt_answer"}`` (exactly
EvoLM's evaluation sets when those are EvoLM's cooked files; works offline) or, without a path, from the task's
Hugging Face hub source, cooked into the same schema.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from evolm_nemo.answers import MODES, gold_answer, nli_label
from evolm_nemo.config.errors import ConfigError, first_line
from evolm_nemo.fileio import iter_jsonl
from evolm_nemo.tasks import SUITE_GROUP, SUITE_KIND, SUITES

COOKED_FIELDS = ("id", "problem", "gt_solution", "gt_answer")


def tasks_dir() -> Path:
    """eval/tasks/ at the repository root (override with EVOLM_EVAL_TASKS)."""
    env = os.environ.get("EVOLM_EVAL_TASKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "eval" / "tasks"


@dataclass(frozen=True)
class Task:
    name: str  # suite key used everywhere (score input rows, reports)
    display_name: str  # as in the paper's tables
    group: str  # "id" | "ood"
    size: int  # problems in EvoLM's evaluation set
    template: str  # prompt template; "{problem}" is replaced verbatim
    stop: tuple[str, ...]  # stop strings for sampling
    evolm_datasets: tuple[str, ...] = ()  # EvoLM's cooked dataset name(s)
    hf: Optional[dict] = field(default=None, compare=False, hash=False)  # hub source and cooking recipe, or None

    @property
    def equivalence(self) -> str:
        """"math" (math-verify), "crux" (Python literals) or "nli" (true / false / uncertain)."""
        return SUITE_KIND[self.name]

    def prompt(self, problem: str) -> str:
        return self.template.replace("{problem}", problem)

    def gold(self, row: dict) -> str:
        return gold_answer(self.name, row)


def _load_task(path: Path) -> Task:
    import yaml

    with open(path, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    where = str(path)
    for key in ("name", "display_name", "group", "size", "template", "stop"):
        if key not in spec:
            raise ConfigError(where, f"missing key '{key}'")
    if spec["name"] not in SUITES:
        raise ConfigError(where, f"name: unknown suite {spec['name']!r}; expected one of {', '.join(SUITES)}")
    if spec["group"] != SUITE_GROUP[spec["name"]]:
        raise ConfigError(where, f"group: {spec['name']} is {SUITE_GROUP[spec['name']]} (evolm_nemo/tasks.py), "
                                 f"got {spec['group']!r}")
    if "{problem}" not in spec["template"]:
        raise ConfigError(where, "template: must contain {problem}")
    unknown = set(spec) - {"name", "display_name", "group", "size", "template", "stop", "evolm_datasets", "hf"}
    if unknown:
        raise ConfigError(where, f"unknown key(s): {', '.join(sorted(unknown))}")
    return Task(
        name=spec["name"],
        display_name=spec["display_name"],
        group=spec["group"],
        size=int(spec["size"]),
        template=spec["template"],
        stop=tuple(spec["stop"]),
        evolm_datasets=tuple(spec.get("evolm_datasets") or ()),
        hf=spec.get("hf"),
    )


def _load_all() -> dict[str, Task]:
    tasks = {}
    for suite in SUITES:
        path = tasks_dir() / f"{suite}.yaml"
        if not path.is_file():
            raise ConfigError(str(path), f"task definition for {suite} is missing")
        tasks[suite] = _load_task(path)
    return tasks


TASKS: dict[str, Task] = _load_all()


def get_task(name: Union[str, Task]) -> Task:
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise ConfigError("tasks", f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


# ------------------------------------------------------------------------------------------------------------------
# Loading problems
# ------------------------------------------------------------------------------------------------------------------


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


FLOAT_MAX = 1.7976931348623157e308  # sys.float_info.max


def non_finite(value, path: str = "", big_ints: bool = False) -> Optional[tuple[str, Union[float, int]]]:
    """``(field path, number)`` of the first number anywhere in ``value`` (a JSON value) that is no finite float --
    NaN / Infinity (which Python's JSON reads) and, with ``big_ints``, an integer past a float's range (it would
    reach tables as inf, or stop a plot with an OverflowError) -- or None. The path is ``path`` followed by the dict
    keys and list indices down to the number, joined by dots."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, int) and not isinstance(value, bool):
        return (path, value) if big_ints and abs(value) > FLOAT_MAX else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        if (found := non_finite(item, f"{path}.{key}" if path else str(key), big_ints)) is not None:
            return found
    return None


# where a null gt_answer's gold answer is taken from, per suite (answers/gold.py)
GOLD_FROM_SOLUTION = {"gsm8k_platinum": "the text after its last '#### '", "math": "its last \\boxed{...}",
                      "boardgameqa": "a True / False / Uncertain label", "strategyqa": "a True / False / Uncertain label"}


def check_problem(row: dict, where: str, suite: Optional[str] = None) -> None:
    """A problem's own fields (``id``, ``problem``, ``gt_solution`` / ``gt_answer``) as scoring reads them: a
    one-line ConfigError naming ``where`` and the field. Evaluation checks them when it reads the problems -- before
    any model is loaded -- so a malformed row never stops a run after its sampling. With ``suite``: the row has a
    gold answer scoring can match (an empty gt_answer, a null one whose gt_solution yields none, or a BoardgameQA /
    StrategyQA label that is not true / false / uncertain, would score every completion wrong without a word)."""

    def bad(name: str, message: str):
        raise ConfigError(where, f"field '{name}': {message}")

    if "id" not in row or row["id"] is None:
        bad("id", "missing")
    if not isinstance(row.get("problem"), str):
        bad("problem", "missing" if "problem" not in row else "expected a string")
    if not row["problem"].strip():
        bad("problem", "empty: the prompt would ask nothing; give the problem text")
    for name in ("gt_solution", "gt_answer"):
        value = row.get(name)
        if value is not None and not isinstance(value, str) and not is_number(value):
            bad(name, f"expected a string or null, got {type(value).__name__}")
    if row.get("gt_answer") is None and row.get("gt_solution") is None:
        bad("gt_answer", "null, and no gt_solution to take the gold answer from")
    for name in ("id", "gt_solution", "gt_answer"):
        if (found := non_finite(row.get(name))) is not None:
            bad(name, f"holds {json.dumps(found[1])}, not a finite number")
    if suite is not None:
        _check_gold(suite, row, bad)


def _check_gold(suite: str, row: dict, bad) -> None:
    gold = gold_answer(suite, row)
    solution = row.get("gt_solution")
    if row.get("gt_answer") is not None and not gold.strip():
        bad("gt_answer", f"{json.dumps(row['gt_answer'])}: an empty gold answer matches no completion (every one "
                         "would be scored wrong); give the answer, or null to take it from gt_solution")
    if row.get("gt_answer") is None and (not gold.strip() or (
            suite == "gsm8k_platinum" and isinstance(solution, str) and "#### " not in solution)):
        how = GOLD_FROM_SOLUTION.get(suite, "the solution itself")
        bad("gt_answer", f"null, and gt_solution {json.dumps(solution)[:80]} holds no gold answer (taken from {how})")
    if SUITE_KIND[suite] == "nli":
        labels = {nli_label(gold, mode) for mode in MODES}
        if None in labels or len(labels) != 1:
            bad("gt_answer", f"{json.dumps(row.get('gt_answer'))[:80]} is not a {suite} label: expected True, False "
                             "or Uncertain (or null with the label in gt_solution)")


def _read_cooked(path: str, limit: Optional[int], suite: Optional[str] = None) -> list[dict]:
    rows, seen = [], {}
    for where, row in iter_jsonl(path, key="path"):
        if limit is not None and len(rows) >= limit:
            break
        for key in COOKED_FIELDS:
            if key not in row:
                raise ConfigError(where, f"field '{key}': missing (cooked schema: {', '.join(COOKED_FIELDS)})")
        check_problem(row, where, suite)
        check_unique(row, where, seen)
        rows.append(row)
    return rows


def check_unique(row: dict, where: str, seen: dict, of: str = "a suite") -> None:
    """A problem id appears once in a suite (``seen``: id -> where it was first): a problem twice would be sampled and
    counted twice in every metric. ``of``: what the rows make up, for the message (an RL prompt set: rolled out and
    trained on twice as often)."""
    first = seen.setdefault(json.dumps(row["id"]), where)
    if first is not where:
        raise ConfigError(where, f"field 'id': {json.dumps(row['id'])} again (first at {first}); each problem is one "
                                 f"row of {of}")


class _Fields(dict):
    """Row fields for str.format_map, plus <list>_enumerated ("1. a\\n2. b\\n") for list-valued fields."""

    def __missing__(self, key: str) -> Any:
        if key.endswith("_enumerated") and isinstance(self.get(key[: -len("_enumerated")]), list):
            return "".join(f"{i + 1}. {x}\n" for i, x in enumerate(self[key[: -len("_enumerated")]]))
        raise KeyError(key)


def cook_row(spec: dict, row: dict, index: int, config: Optional[str] = None) -> Optional[dict]:
    """One hub row -> the cooked schema, per the task's `hf` recipe (None when the recipe filters the row out)."""
    fields = _Fields(row)
    for name, mapping in (spec.get("map") or {}).items():
        if fields.get(name) in mapping:
            fields[name] = mapping[fields[name]]
    fields.update(index=index, config=config)

    def render(template):
        return None if template is None else template.format_map(fields)

    cooked = {key: render(spec.get(key)) for key in COOKED_FIELDS}
    max_tokens = spec.get("max_estimated_tokens")
    if max_tokens is not None and len(cooked["problem"].split()) * 1.3 > max_tokens:
        return None
    return cooked


def _load_hub(task: Task, limit: Optional[int]) -> list[dict]:
    """The task's hub rows, cooked and checked as a local file's are (``check_problem``): a row scoring cannot read
    is refused here, before any model loads. ``hf.path`` may also be a local dataset directory."""
    from datasets import load_dataset

    spec = task.hf
    rows: list[dict] = []
    seen: dict = {}
    for config in spec.get("configs") or [None]:
        try:
            ds = load_dataset(spec["path"], config, split=spec["split"])
        except Exception as exc:  # offline, no access, a moved dataset: one line, not the hub client's traceback
            first = first_line(exc)
            raise ConfigError("data_dir", f"cannot load {task.name} from the hub ({spec['path']}: {first}); pass "
                                          "data_dir=<dir of cooked JSONLs> to evaluate offline") from None
        for index, row in enumerate(ds):
            cooked = cook_row(spec, dict(row), index, config)
            if cooked is not None:
                where = f"{spec['path']}{f' ({config})' if config else ''} {spec['split']} row {index}"
                check_problem(cooked, where, task.name)
                check_unique(cooked, where, seen)
                rows.append(cooked)
            if limit is not None and len(rows) >= limit:
                return rows
    return rows


def load_problems(task: Union[str, Task], path: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """Problems of a task in the cooked schema: from `path` (a cooked JSONL, offline) or the task's hub source."""
    task = get_task(task)
    if limit is not None and limit < 0:
        raise ConfigError("limit", f"expected a non-negative number, got {limit}")
    if path is not None:
        return _read_cooked(path, limit, task.name)
    if not task.hf:
        raise ConfigError("path", f"task {task.name} has no hub source; pass a cooked JSONL (EvoLM's "
                                  f"{'/'.join(task.evolm_datasets) or task.name}.jsonl)")
    return _load_hub(task, limit)
