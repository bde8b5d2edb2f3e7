"""A learnable reward-model task from the demo's held-out word problems, in `evolm score`'s input format.

Each problem gets correct completions (the reference solution, restated in a few phrasings, ending with the
boxed answer) and incorrect ones (the same solution whose final answer is off by a few and stated without the box,
as small models' failures often are). `evolm score` then judges them with the shared checker, so the labels the
RM learns come from the same code as evaluation and RL rewards."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

PHRASES = ("", "Let me think. ", "Step by step: ", "We compute. ")


def completions_rows(eval_path: Path, problems: int, per_class: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for line in Path(eval_path).read_text().splitlines()[:problems]:
        q = json.loads(line)
        body = q["solution"].replace(f"The answer is \\boxed{{{q['answer']}}}.", "").strip()
        good = [f" {PHRASES[k % len(PHRASES)]}{body} The answer is \\boxed{{{q['answer']}}}." for k in range(per_class)]
        bad = []
        for k in range(per_class):
            wrong = str(int(q["answer"]) + rng.choice([1, 2, 3, -1, -2])) if re.fullmatch(r"-?\d+", q["answer"]) \
                else q["answer"] + "0"
            bad.append(f" {PHRASES[k % len(PHRASES)]}{body} So the result is {wrong}.")
        comps = good + bad
        rng.shuffle(comps)
        rows.append({"suite": "gsm8k_platinum", "id": q["id"], "problem": q["problem"],
                     "gt_solution": f"{q['solution']}\n#### {q['answer']}", "gt_answer": None, "completions": comps})
    return rows


def write_completions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
