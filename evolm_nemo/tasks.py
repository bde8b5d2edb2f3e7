"""The task registry: EvoLM's six downstream suites (name, ID/OOD group, how answers compare) and six upstream lm-eval
tasks, the prompt template and the stop strings. Standard library only, so every layer (answers, data, conversion,
rl, evaluation) reads it; evolm_nemo/evaluation/tasks.py adds each suite's data (eval/tasks/<suite>.yaml)."""

from __future__ import annotations

from typing import Sequence

# suite -> ("id" | "ood", how answers compare: "math" (math-verify), "crux" (Python literals), "nli" (true / false /
# uncertain)); in the canonical order of tables and summaries
_SUITES = {
    "gsm8k_platinum": ("id", "math"),
    "math": ("id", "math"),
    "cruxeval": ("ood", "crux"),
    "boardgameqa": ("ood", "nli"),
    "tabmwp": ("ood", "math"),
    "strategyqa": ("ood", "nli"),
}
SUITES = tuple(_SUITES)
SUITE_GROUP = {suite: group for suite, (group, _) in _SUITES.items()}
SUITE_KIND = {suite: kind for suite, (_, kind) in _SUITES.items()}
ID_SUITES = tuple(s for s in SUITES if SUITE_GROUP[s] == "id")
OOD_SUITES = tuple(s for s in SUITES if SUITE_GROUP[s] == "ood")

# lm-eval 0-shot tasks -> their column names in EvoLM's upstream table
UPSTREAM_NAMES = {"hellaswag": "HellaSwag", "winogrande": "Winogrande", "piqa": "PIQA", "openbookqa": "OBQA",
                  "arc_easy": "ARC-E", "arc_challenge": "ARC-C"}
UPSTREAM = tuple(UPSTREAM_NAMES)

# EvoLM's prompt (LLaMA-Factory "default"; eval/tasks/*.yaml spell it too): "{problem}" in evaluation,
# "{question}" in the training configs
TEMPLATE = "Human: {problem}\nAssistant:"
QUESTION_TEMPLATE = TEMPLATE.replace("{problem}", "{question}")
TURN_MARKERS = ("Human:", "Assistant:")  # the template's turn markers: the demo's completions end at them
STOP = ("Human", "Human:", "Assistant", "Assistant:")  # EvoLM's stop strings for sampling


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    hits = [i for i in (text.find(s) for s in stop if s) if i != -1]
    return text[:min(hits)] if hits else text
